"""Account pages: sign-up, log-in, log-out, password change, API tokens."""

from django.contrib import messages
from django.contrib.auth import login, logout
from django.contrib.auth.decorators import login_required
from django.contrib.auth.views import PasswordChangeView
from django.core.paginator import Paginator
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import reverse_lazy
from django.utils.http import url_has_allowed_host_and_scheme
from django.views.decorators.http import require_POST

from reclo_site.errors import ServiceError
from reclo_site.http import client_address

from . import services
from .forms import LoginForm, SignupForm, TokenCreateForm
from .models import ApiToken, AuditEvent


def signup(request):
    if request.user.is_authenticated:
        return redirect("backups:dashboard")
    form = SignupForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        user = form.save()
        if user is not None:
            login(request, user, backend="django.contrib.auth.backends.ModelBackend")
            messages.success(request, f"Welcome to ReClo, {user.username}. Add your first server below.")
            return redirect("backups:dashboard")
    return render(request, "accounts/signup.html", {"form": form})


def login_view(request):
    if request.user.is_authenticated:
        return redirect("backups:dashboard")
    form = LoginForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        try:
            user = services.user_check_login(
                email=form.cleaned_data["email"],
                password=form.cleaned_data["password"],
                address=client_address(request),
            )
        except ServiceError as exc:
            form.add_error(None, exc.message)
        else:
            login(request, user)
            target = request.POST.get("next") or request.GET.get("next")
            if target and url_has_allowed_host_and_scheme(target, {request.get_host()}, request.is_secure()):
                return redirect(target)
            return redirect("backups:dashboard")
    return render(request, "accounts/login.html", {"form": form, "next": request.GET.get("next", "")})


@require_POST
def logout_view(request):
    logout(request)
    messages.info(request, "You have been logged out.")
    return redirect("accounts:login")


class PasswordChange(PasswordChangeView):
    template_name = "accounts/password_change.html"
    success_url = reverse_lazy("accounts:tokens")

    def form_valid(self, form):
        messages.success(self.request, "Your password has been changed.")
        return super().form_valid(form)


@login_required
def tokens(request):
    form = TokenCreateForm(request.POST or None)
    new_key = None
    if request.method == "POST" and form.is_valid():
        token, new_key = services.token_create(
            user=request.user, name=form.cleaned_data["name"], address=client_address(request)
        )
        messages.success(request, f"Token “{token.name}” created. Copy it now: it will not be shown again.")
        form = TokenCreateForm()
    rows = ApiToken.objects.filter(user=request.user)
    response = render(request, "accounts/tokens.html", {"form": form, "tokens": rows, "new_key": new_key})
    # The page may show a fresh token: keep it out of every cache.
    response["Cache-Control"] = "no-store"
    return response


@login_required
@require_POST
def token_revoke(request, token_id):
    token = get_object_or_404(ApiToken, pk=token_id, user=request.user)
    services.token_revoke(token=token, address=client_address(request))
    messages.success(request, f"Token “{token.name}” revoked; agents using it must log in again.")
    return redirect("accounts:tokens")


@login_required
def activity(request):
    """The owner's own audit log, newest first."""
    page = Paginator(AuditEvent.objects.filter(user=request.user), 50).get_page(request.GET.get("page"))
    return render(request, "accounts/activity.html", {"page": page})
