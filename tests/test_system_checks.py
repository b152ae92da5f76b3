"""Django's system checks (admin, models, URLs) pass: `make run` migrates, and migrate stops on any error."""

from django.core.management import call_command


def test_system_checks_pass() -> None:
    call_command("check", fail_level="WARNING")
