"""``manage.py create_token NAME [--staff]``: create an API token and print its key as the last line."""

from django.core.management.base import BaseCommand, CommandError, CommandParser

from registry.models import ApiToken
from registry.validators import IDENTIFIER_RE


class Command(BaseCommand):
    help = "Create an API token named NAME and print its key (shown only once) as the last line."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("name", help="a name for the token's holder, e.g. 'kafka-source'")
        parser.add_argument("--staff", action="store_true", help="the token may change every service")

    def handle(self, *args, name: str, staff: bool, **options) -> None:  # type: ignore[no-untyped-def]
        if not IDENTIFIER_RE.match(name):
            raise CommandError(f"NAME must be 1..128 characters of [A-Za-z0-9._:-], got {name!r}")
        if ApiToken.objects.filter(name=name).exists():
            raise CommandError(f"a token named {name!r} exists; pick another name or delete it in the admin")
        key = ApiToken.generate_key()
        token = ApiToken(name=name, is_staff=staff)
        token.set_key(key)
        token.save()
        kind = "staff token" if staff else "token"
        self.stderr.write(f"Created {kind} {name!r}. Keep the key below: it is not stored and cannot be shown again.")
        self.stdout.write(key)
