"""The ``advtrain`` command line: a thin layer that builds API objects and hands them over.

``advtrain train | evaluate | attack``: each command parses its flags, builds the dataset, model,
threat model and attack through the library, calls the library, and prints or writes what it
returns; it computes nothing itself. One module per command (:mod:`.train`, :mod:`.evaluate`,
:mod:`.attack`); what they share lies in :mod:`.loading` (a model and its data from a run
directory or a model file), :mod:`.attack_options` (``--option key=value``) and
:mod:`.processes` (torchrun).

Bad input of any kind (an unknown name, a bad number, a missing or corrupt file) ends with one
line on standard error, ``advtrain: error: ...``, and exit status 2; never a traceback.
"""

from __future__ import annotations

import sys

import click

from ..errors import AdvtrainError
from . import attack, evaluate, poisoning, serve, train, tuning

__all__ = ["EXIT_BAD_INPUT", "cli", "main", "run"]

EXIT_BAD_INPUT = 2
# click >= 8.2 raises this for a bare `advtrain`; older versions print the help themselves.
_NO_ARGS_IS_HELP: type[Exception] | tuple[()] = getattr(click.exceptions, "NoArgsIsHelpError", ())


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="advtrain", prog_name="advtrain")
def cli() -> None:
    """Attack, harden and honestly measure the adversarial robustness of PyTorch classifiers."""


cli.add_command(train.train)
cli.add_command(evaluate.evaluate)
cli.add_command(attack.attack)
cli.add_command(poisoning.backdoor)
cli.add_command(poisoning.scan)
cli.add_command(serve.serve)
cli.add_command(serve.monitor)
cli.add_command(tuning.sweep)
cli.add_command(tuning.check)


def run(argv: list[str] | None = None) -> int:
    """Run the CLI and return its exit status (no ``sys.exit``), for tests and ``main``."""
    try:
        result = cli.main(args=argv, prog_name="advtrain", standalone_mode=False)
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except _NO_ARGS_IS_HELP as exc:  # bare `advtrain`: the help, as usual
        context = getattr(exc, "ctx", None)
        click.echo(context.get_help() if context else "")
        return 0
    except click.ClickException as exc:
        return _fail(exc.format_message())
    except AdvtrainError as exc:
        return _fail(str(exc))
    except OSError as exc:
        return _fail(f"{exc.strerror or exc}: '{exc.filename}'" if exc.filename else str(exc))
    except (click.exceptions.Abort, KeyboardInterrupt):
        click.echo("advtrain: interrupted", err=True)
        return 130
    return result if isinstance(result, int) else 0


def _fail(message: str) -> int:
    one_line = " ".join(str(message).split())
    click.echo(f"advtrain: error: {one_line}", err=True)
    return EXIT_BAD_INPUT


def main() -> None:
    """The console script ``advtrain`` and ``python -m advtrain``."""
    sys.exit(run())
