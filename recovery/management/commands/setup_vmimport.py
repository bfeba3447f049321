"""Create (or update) the `vmimport` service role that EC2 VM Import needs."""

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from reclo_site import cloud
from reclo_site.cloud import imaging, storage
from recovery.steps import IMAGES_PREFIX


class Command(BaseCommand):
    help = (
        "Create the IAM role VM Import uses (RECLO_VMIMPORT_ROLE, 'vmimport' by default): trusted by "
        "vmie.amazonaws.com, allowed to read the consolidated disks and register images. Idempotent. "
        "Needed only with RECLO_IMPORT_METHOD=vm_import; run once per AWS account with IAM rights."
    )

    def handle(self, *args, **options):
        role = settings.RECLO_VMIMPORT_ROLE
        try:
            arn = imaging.ensure_vmimport_role(role_name=role, bucket=storage.bucket_name(), prefix=IMAGES_PREFIX)
        except cloud.CloudError as exc:
            raise CommandError(f"could not prepare role {role}: {exc}") from exc
        self.stdout.write(f"role {role} ready: {arn} (reads s3://{storage.bucket_name()}/{IMAGES_PREFIX}*)")
