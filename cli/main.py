"""The ``ldreg`` command line.

Each group of commands lives in its own module and imports heavy libraries (torch,
the service) inside the command, so ``ldreg api`` starts without loading torch.
"""

from __future__ import annotations

import typer

from cli import admin, local, remote
from cli import scheduling as scheduling_cmds
from cli import service as service_cmds

app = typer.Typer(
    name="ldreg",
    help="LDReg: local-dimensionality regularized SSL, as a library, a CLI and a service.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
admin_app = typer.Typer(help="Administration: migrations, teams, API keys.", no_args_is_help=True)
app.add_typer(admin_app, name="admin")

admin_app.command("migrate")(admin.migrate)
admin_app.command("create-team")(admin.create_team)
admin_app.command("create-key")(admin.create_key)
admin_app.command("revoke-key")(admin.revoke_key)
admin_app.command("team-weight")(admin.team_weight)

# The service: API and worker together, or alone.
app.command("serve")(service_cmds.serve)
app.command("api")(service_cmds.api)
app.command("worker")(service_cmds.worker)

# Local work, no service.
app.command("pretrain")(local.pretrain)
app.command("lid")(local.lid)

# The HTTP client (LDREG_URL, LDREG_API_KEY).
app.command("submit")(remote.submit)
app.command("jobs")(remote.jobs)
app.command("status")(remote.status)
app.command("watch")(remote.watch)
app.command("logs")(remote.logs)
app.command("metrics")(remote.metrics)
app.command("cancel")(remote.cancel)
app.command("retry")(remote.retry)
app.command("artifacts")(remote.artifacts)
app.command("download")(remote.download)
app.command("diagnose")(remote.diagnose)
app.command("compare")(remote.compare)
app.command("sweep")(remote.sweep)
app.command("report")(remote.report)
app.command("workers")(scheduling_cmds.workers)
app.command("queue")(scheduling_cmds.queue)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
