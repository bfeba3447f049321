"""Create the backup bucket (private, encrypted, versioned, with Object Lock) if it is missing."""

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from reclo_site import cloud
from reclo_site.cloud import storage


class Command(BaseCommand):
    help = "Prepare the cloud resources ReClo needs (idempotent): the backup bucket."

    def handle(self, *args, **options):
        try:
            storage.ensure_bucket()
        except cloud.CloudError as exc:
            raise CommandError(f"could not prepare bucket {settings.RECLO_BUCKET}: {exc}") from exc
        self.stdout.write(
            f"bucket {settings.RECLO_BUCKET} ready (private, encrypted at rest, versioned, with Object Lock)"
        )
