"""Resolvers for `accounts.permissions`: which server a backup or upload id belongs to."""

from .models import Backup


def backup_in_url(kwarg: str):
    """Resolver: the server of the caller's backup (or upload: the same id) named by URL parameter `kwarg`.

    None when the caller has no such backup, so the view answers its own 404
    (also for another tenant's id).
    """

    def resolve(request, view):
        return (
            Backup.objects.filter(user=request.user, pk=view.kwargs.get(kwarg))
            .values_list("server__name", flat=True)
            .first()
        )

    return resolve
