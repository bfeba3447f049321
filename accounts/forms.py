"""Forms of the account pages; validation rules live in services."""

from django import forms

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
