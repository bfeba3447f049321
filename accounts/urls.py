from django.urls import path

from . import views

app_name = "accounts"

urlpatterns = [
    path("signup/", views.signup, name="signup"),
    path("login/", views.login_view, name="login"),
    path("verify/", views.verify, name="verify"),
    path("logout/", views.logout_view, name="logout"),
    path("password/", views.PasswordChange.as_view(), name="password-change"),
    path("password/reset/", views.PasswordReset.as_view(), name="password-reset"),
    path("password/reset/sent/", views.PasswordResetSent.as_view(), name="password-reset-sent"),
    path("password/reset/<uidb64>/<token>/", views.PasswordResetConfirm.as_view(), name="password-reset-confirm"),
    path("password/reset/done/", views.PasswordResetComplete.as_view(), name="password-reset-complete"),
    path("security/", views.security, name="security"),
    path("security/time-zone/", views.time_zone_set, name="time-zone"),
    path("security/two-factor/", views.twofactor_setup, name="twofactor-setup"),
    path("security/two-factor/off/", views.twofactor_disable, name="twofactor-disable"),
    path("security/recovery-codes/", views.recovery_codes_new, name="recovery-codes-new"),
    path("tokens/", views.tokens, name="tokens"),
    path("tokens/<int:token_id>/revoke/", views.token_revoke, name="token-revoke"),
    path("activity/", views.activity, name="activity"),
]
