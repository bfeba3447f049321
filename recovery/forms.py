"""The fail-over form: which restore point, what size, and a confirmation."""

from django import forms
from django.template.defaultfilters import filesizeformat

from reclo_site.localtime import when as local_when

from . import selectors, sizes


class RestorePointChoice(forms.ModelChoiceField):
    def label_from_instance(self, backup) -> str:
        # In the owner's zone (pages activate it), in plain words.
        kind = "full copy" if backup.kind == "full" else "changes"
        return (
            f"{local_when(backup.date_created)} · disk {backup.disk} · {kind} · "
            f"{backup.get_consistency_display()} · {filesizeformat(backup.virtual_size)} disk"
        )


class FailoverForm(forms.Form):
    backup = RestorePointChoice(
        queryset=None,
        label="Restore point",
        empty_label=None,
        help_text="The server comes back as it was at this point. The newest verified one is chosen for you.",
    )
    instance_type = forms.ChoiceField(
        label="Server size",
        widget=forms.RadioSelect,
        help_text="You can fail over again with another size later. Prices are per hour while it runs.",
    )
    confirm = forms.BooleanField(
        label="Start the server in the cloud; I understand it is billed by the hour until it is stopped or terminated.",
        required=True,
        error_messages={"required": "Tick the box to confirm the failover."},
    )

    def __init__(self, *args, server, **kwargs):
        super().__init__(*args, **kwargs)
        points = selectors.restore_points(server=server)
        self.points = points  # the choices, for the page's figures
        self.fields["backup"].queryset = points
        newest = points.first()
        self.recommended = sizes.size_for_disk(newest.virtual_size if newest else 0)
        if newest is not None:
            self.fields["backup"].initial = newest.pk
        self.fields["instance_type"].choices = [(size.instance_type, size.instance_type) for size in sizes.SIZES]
        self.fields["instance_type"].initial = self.recommended.instance_type
        self.size_rows = [
            {
                "size": size,
                "total": sizes.total_hourly(size),
                "daily": sizes.total_hourly(size) * 24,
                "windows_total": sizes.total_hourly(size) - size.hourly_usd + size.windows_hourly_usd,
                "recommended": size == self.recommended,
            }
            for size in sizes.SIZES
        ]
