"""`manage.py build_agent`: build the agent bundle the portal serves (reclo_site.agent_bundle)."""

from django.core.management.base import BaseCommand

from reclo_site import agent_bundle


class Command(BaseCommand):
    help = "Build the agent bundle served at /agent/reclo-agent.tar.gz (only when the agent's source changed)."

    def add_arguments(self, parser):
        parser.add_argument("--force", action="store_true", help="build even if the bundle is up to date")
        parser.add_argument(
            "--no-native-wheels",
            action="store_true",
            help="skip fetching the compiled dependency for other Pythons (offline builds)",
        )

    def handle(self, *args, force=False, no_native_wheels=False, **options):
        path, built = agent_bundle.build(force=force, native_wheels=not no_native_wheels)
        size = path.stat().st_size / 1e6
        self.stdout.write(f"{'built' if built else 'up to date'}: {path} ({size:.1f} MB)")
