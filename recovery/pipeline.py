"""What a step pipeline is made of: steps, step tables, pipelines, and what a step handler answers.

Plain values, no models and no engine: the step tables (`recovery/failover.py`),
the models that take their status choices from them, the handlers
(`recovery/steps.py`), `recovery/networks.py` and the engine
(`recovery/engine.py`) all import this module, and none of them needs another
to say "done", "wait" or "failed".

A `Pipeline` names its models and handlers by dotted path, resolved when the
engine runs, so a models module can build its status choices from a step
table without importing the handlers (which import the models).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta

from django.apps import apps
from django.conf import settings
from django.utils.module_loading import import_string

from reclo_site.errors import Code

# --- What a step handler returns or raises ------------------------------------------------


@dataclass
class Done:
    """The step finished; `outputs` are merged into what it saved along the way."""

    outputs: dict = field(default_factory=dict)
    detail: str = ""
    skipped: bool = False


@dataclass
class Wait:
    """Not there yet (AWS is busy, another worker holds a shared resource): run the step again in `seconds`."""

    seconds: float
    detail: str = ""


class StepFailed(Exception):
    """A failure no retry will fix, with its `code` (docs/api.md) and a `reason` for people."""

    def __init__(self, code: Code, reason: str):
        super().__init__(reason)
        self.code = Code.of(code)
        self.reason = reason


# --- Steps and their tables ---------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    """One step of a pipeline: its status name, what pages call it, who does it, how long it may take.

    `handler` is the dotted path of a function `(StepContext) -> Done | Wait`
    (it may raise `StepFailed`), looked up each time the step runs. A step
    that misses its `deadline` (counted from its first start), or whose
    cloud call is refused, or that crashes, fails its run with `error_code`.
    `label` is the status's label in the model's choices (by default the
    name, capitalised).
    """

    name: str
    title: str
    handler: str
    deadline: timedelta
    error_code: Code
    label: str = ""

    @property
    def status_label(self) -> str:
        return self.label or self.name.replace("_", " ").title()

    def run(self, ctx) -> Done | Wait:
        """Call the handler on `ctx` (resolved now, so tests and reloads see the current function)."""
        return import_string(self.handler)(ctx)


class StepTable:
    """The steps of a pipeline, in the order they run."""

    def __init__(self, *steps: Step):
        if len({step.name for step in steps}) != len(steps):
            raise ValueError("step names must be unique")
        self._steps = tuple(steps)
        self._by_name = {step.name: step for step in steps}

    def __iter__(self) -> Iterator[Step]:
        return iter(self._steps)

    def __len__(self) -> int:
        return len(self._steps)

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def __getitem__(self, name: str) -> Step:
        return self._by_name[name]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._by_name)

    @property
    def first(self) -> Step:
        return self._steps[0]

    def after(self, name: str) -> Step | None:
        """The step that follows `name`, or None after the last."""
        index = self._steps.index(self._by_name[name])
        return self._steps[index + 1] if index + 1 < len(self._steps) else None

    def title(self, name: str) -> str:
        """What pages call the step `name` (the name itself if the table has no such step)."""
        step = self._by_name.get(name)
        return step.title if step else name


# --- Pipelines ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Pipeline:
    """A persisted, resumable run of steps that the engine (`recovery.engine`) advances.

    The failover is one (`recovery.failover.FAILOVER`); a drill is another,
    with its own models and table. What the engine needs of them:

    - `model` ("app_label.Model"), the run: fields `status` (`queued`, then
      each step's name, then `succeeded` or `failed`), `error_code`,
      `error`, `lease_token`, `lease_until`, `due_at`, `updated`,
      `finished`.
    - `step_model`, one row per step: a foreign key `run_field` to the run,
      `name`, `position`, `status` (pending, running, waiting, done,
      skipped, failed), `started`, `finished`, `deadline`, `attempts`,
      `retries`, `waited`, `outputs` (JSON), `detail`, `error`.
    - `task`, the dotted path of the Celery task `(run_id: str, step: str)`
      that calls `engine.run_step(run_id, step, pipeline=...)`.
    - `on_exit`, optionally the dotted path of `(run_id, status)`, called
      after commit whenever a run ends, succeeded or failed (a drill's
      teardown). It must be idempotent: it can run again after a crash.
    - `lease_setting`, the setting (a timedelta) after which a step whose
      worker stopped reporting is taken over by the reconciler.
    """

    name: str
    model: str
    step_model: str
    run_field: str
    steps: StepTable
    task: str
    queued: str = "queued"
    succeeded: str = "ready"
    failed: str = "failed"
    on_exit: str | None = None
    select_related: tuple[str, ...] = ()
    lease_setting: str = "RECLO_RECOVERY_STALE_AFTER"

    @property
    def active(self) -> tuple[str, ...]:
        """Statuses of a run still on its way."""
        return (self.queued, *self.steps.names)

    @property
    def finished(self) -> tuple[str, ...]:
        return (self.succeeded, self.failed)

    def status_choices(self) -> list[tuple[str, tuple[str, str]]]:
        """Members for the run model's `TextChoices`: queued, the steps in order, succeeded, failed."""
        ends = [(self.queued, self.queued.title())]
        ends += [(step.name, step.status_label) for step in self.steps]
        ends += [(self.succeeded, self.succeeded.title()), (self.failed, self.failed.title())]
        return [(value.upper(), (value, label)) for value, label in ends]

    def step_for_status(self, status: str) -> str | None:
        """The step a run in `status` is at (queued is about to start the first)."""
        if status == self.queued:
            return self.steps.first.name
        return status if status in self.steps else None

    @property
    def lease(self) -> timedelta:
        return getattr(settings, self.lease_setting)

    @property
    def runs(self):
        """The run model's manager."""
        return apps.get_model(self.model)._default_manager

    @property
    def step_rows(self):
        """The step model's manager."""
        return apps.get_model(self.step_model)._default_manager

    def step_rows_of(self, run_id):
        return self.step_rows.filter(**{f"{self.run_field}_id": run_id})
