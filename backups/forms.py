"""Forms of the backup pages."""

from django import forms


class BackupDeleteForm(forms.Form):
    """The confirmation of a delete; it names how many dependents the page showed.

    If an incremental arrived on top of the backup after the page was shown,
    the numbers differ and the owner confirms again instead of deleting a
    restore point they never saw.
    """

    dependents = forms.IntegerField(min_value=0, widget=forms.HiddenInput)

    def __init__(self, *args, dependents: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.current = dependents
        self.fields["dependents"].initial = dependents

    def clean(self):
        data = super().clean()
        # A form-wide error: the field is hidden, so that is where it shows.
        if "dependents" in data and data["dependents"] != self.current:
            raise forms.ValidationError(
                "Restore points were added to this chain since the page was shown; check the list and confirm again."
            )
        return data


class AddServerForm(forms.Form):
    """The name of a server to protect; the enrollment service checks it."""

    name = forms.CharField(
        label="Server name",
        max_length=63,
        help_text="How this server shows up here, e.g. <code>reception</code>: letters, digits, "
        "<code>.</code>, <code>_</code> and <code>-</code>. An existing server's name makes a new key for it.",
        widget=forms.TextInput(attrs={"placeholder": "reception", "autocomplete": "off", "spellcheck": "false"}),
    )
