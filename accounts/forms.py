"""Forms of the account pages; validation rules live in services."""

from django import forms
from django.contrib.auth import forms as auth_forms
from django.db import transaction

from reclo_site.errors import ServiceError

from . import services


class SignupForm(forms.Form):
    username = forms.CharField(max_length=150, help_text="5–150 characters: letters, digits, '.', '_' or '-'.")
    email = forms.EmailField()
    password = forms.CharField(
        widget=forms.PasswordInput(attrs={"autocomplete": "new-password"}),
        strip=False,
        help_text="At least 12 characters, not a common password.",
    )
    password_again = forms.CharField(
        label="Password (again)", strip=False, widget=forms.PasswordInput(attrs={"autocomplete": "new-password"})
    )
    # Filled in by the browser (static/js/timezone.js); UTC without JavaScript.
    time_zone = forms.CharField(required=False, max_length=64, widget=forms.HiddenInput(attrs={"data-detect-zone": ""}))

    def clean(self):
        data = super().clean()
        if data.get("password") and data.get("password_again") and data["password"] != data["password_again"]:
            self.add_error("password_again", "The two passwords differ.")
        return data

    def save(self):
        """Register through the service; its refusals become field errors."""
        try:
            return services.user_register(
                username=self.cleaned_data["username"],
                email=self.cleaned_data["email"],
                password=self.cleaned_data["password"],
                time_zone=self.cleaned_data.get("time_zone") or "UTC",
            )
        except ServiceError as exc:
            for field, problems in (exc.fields or {None: [exc.message]}).items():
                for problem in problems:
                    self.add_error(field if field in self.fields else None, problem)
            return None


class LoginForm(forms.Form):
    email = forms.EmailField(widget=forms.EmailInput(attrs={"autocomplete": "email", "autofocus": True}))
    password = forms.CharField(strip=False, widget=forms.PasswordInput(attrs={"autocomplete": "current-password"}))


class TokenCreateForm(forms.Form):
    name = forms.CharField(
        max_length=100, initial="agent", help_text="Where the token will be used, e.g. the server's name."
    )


class CodeForm(forms.Form):
    """One code from the authenticator app, or a recovery code."""

    code = forms.CharField(
        label="Code",
        max_length=64,
        help_text="The 6-digit code your authenticator app shows now, or one of your recovery codes.",
        widget=forms.TextInput(
            attrs={"autocomplete": "one-time-code", "autofocus": True, "spellcheck": "false", "autocapitalize": "off"}
        ),
    )


class SetupCodeForm(forms.Form):
    code = forms.CharField(
        label="Code from the app",
        max_length=16,
        help_text="The 6 digits the app shows after you add ReClo to it.",
        widget=forms.TextInput(attrs={"autocomplete": "one-time-code", "inputmode": "numeric", "autofocus": True}),
    )


class PasswordResetForm(auth_forms.PasswordResetForm):
    """Django's reset form; the email goes out from a worker (see services.password_reset_email_send)."""

    email = forms.EmailField(
        label="Email", max_length=254, widget=forms.EmailInput(attrs={"autocomplete": "email", "autofocus": True})
    )

    def save(self, **kwargs):
        """Enqueue one email per matching active user; nothing for an unknown address."""
        from .tasks import password_reset_email_send

        for user in self.get_users(self.cleaned_data["email"]):
            transaction.on_commit(lambda pk=user.pk: password_reset_email_send.delay(pk))


class TimeZoneForm(forms.Form):
    """The zone every time on the pages and in emails is shown in."""

    time_zone = forms.ChoiceField(label="Time zone", choices=())

    def __init__(self, *args, **kwargs):
        from reclo_site.localtime import zone_names

        super().__init__(*args, **kwargs)
        self.fields["time_zone"].choices = [(name, name.replace("_", " ")) for name in sorted(zone_names())]
