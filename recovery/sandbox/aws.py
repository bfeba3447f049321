"""The aws sandbox: boot a restore point's EC2 image where nothing can reach it, judge it, delete it all.

The image is made as the failover makes it (EBS direct): :meth:`AwsSandbox.prepare`
writes the chain's non-zero 512 KiB pieces into a new EBS snapshot
(StartSnapshot with a ClientToken, PutSnapshotBlock, CompleteSnapshot), then
RegisterImage with the boot mode the preflight reported. :meth:`AwsSandbox.run`
then, for one boot:

- makes a VPC of its own with one subnet and no internet gateway (its route
  table has the VPC's local route only: no route out, and nothing can come
  in), and a security group with no inbound rule and its default outbound
  rule revoked, so it admits nothing and lets nothing out;
- launches the image there (RunInstances with a ClientToken, no public
  address), waits for it to run, reads ``GetConsoleOutput(Latest=True)``
  until a ready line or a failure signature (the same patterns as the local
  sandbox), waits for EC2's system and instance status checks, and keeps a
  ``GetConsoleScreenshot`` (converted to PNG);
- terminates the instance and deletes the subnet, the group and the VPC,
  whatever happened.

The port probe of the local sandbox cannot be made here: nothing may reach
the isolated subnet, the portal included. When the drill asks for a port
the verdict says so in ``details["not_checked"]`` instead of a check.

Everything is tagged like a failover's resources (``reclo:managed``,
``reclo:tenant``, ``reclo:role``) plus ``reclo:drill`` (the request's label)
and ``reclo:deadline`` (epoch seconds after which nothing of the run may
live). :meth:`AwsSandbox.destroy` deletes everything of one label (the drill's
teardown calls it, so the image and snapshot go too, and a worker SIGKILLed
mid-boot leaves nothing once its drill ends); :meth:`AwsSandbox.reap` deletes
everything whose deadline passed (a periodic job). Every AWS call goes
through the cloud adapter (``reclo_site.cloud``).
"""

from __future__ import annotations

import io
import logging
import time
import uuid
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from pathlib import Path

from reclo_site.cloud import CloudError, compute, imaging, network

from . import verdict as judge
from .base import BootRequest, Check, Sandbox, SandboxError, Verdict

log = logging.getLogger(__name__)

DRILL_TAG = "reclo:drill"
DEADLINE_TAG = "reclo:deadline"
BOOT_MODES = {"bios": "legacy-bios", "uefi": "uefi"}
# The isolated network: one private range, nothing routed out of it.
CIDR = "10.250.0.0/24"
STATUS_CHECK = "EC2's system and instance status checks passed"
# A run's resources may outlive its time limit by this much before reap() removes them.
TEARDOWN_GRACE = 30 * 60
# How long the teardown waits for the instance to terminate before deleting its network.
TERMINATE_WAIT = 180.0
# An image and its snapshot live as long as the drill that made them; this
# bounds them when that drill is never torn down (reap).
IMAGE_LIFETIME = 24 * 3600


def image_name(label: str) -> str:
    """The drill image's name (unique in an account and region, so the image is found again by it)."""
    return f"reclo-{label}"


class AwsSandbox(Sandbox):
    """Boots an EC2 image in an isolated subnet of its own. See the module docstring.

    ``tags`` are added to everything it creates (the tenant, say);
    ``instance_type`` is what the image is launched as; ``poll`` is the
    pause between looks at the console and the status checks.
    """

    name = "aws"

    def __init__(
        self,
        *,
        tags: dict | None = None,
        instance_type: str = "t3.small",
        poll: float = 5.0,
        terminate_wait: float = TERMINATE_WAIT,
    ) -> None:
        self.tags = dict(tags or {})
        self.instance_type = instance_type
        self.poll = poll
        self.terminate_wait = terminate_wait

    def _tags(self, label: str, role: str, deadline: float) -> dict:
        return {
            "reclo:managed": "true",
            **self.tags,
            "reclo:role": role,
            DRILL_TAG: label,
            DEADLINE_TAG: str(int(deadline)),
            "Name": f"reclo {label} ({role})",
        }

    # -- the image ---------------------------------------------------------

    def prepare(
        self,
        blocks: Iterable[tuple[int, bytes]],
        *,
        virtual_size: int,
        request: BootRequest,
        description: str,
        heartbeat: Callable[[], None] | None = None,
    ) -> str:
        """Write ``(index, 512 KiB)`` EBS blocks into a new snapshot and register it as an image; its id.

        Resumable: the image is found by its name and the snapshot by its
        tag before anything is created (the StartSnapshot ClientToken covers a
        retried call on AWS); blocks of a snapshot still pending are simply
        written again (rewriting a block is harmless). ``heartbeat`` is
        called while AWS seals the snapshot and registers the image (a step
        renewing its lease; ``blocks`` may renew it as it is read). The image lives until
        :meth:`destroy` of the label (or :meth:`reap` a day later).
        """
        label = request.label
        name = image_name(label)
        found = imaging.find_image(name)
        if found:
            return self._image_ready(found["image_id"], heartbeat)
        deadline = time.time() + IMAGE_LIFETIME
        gib = imaging.volume_gib(virtual_size)
        snapshots = imaging.find_snapshots({DRILL_TAG: label, "reclo:role": "drill-disk"})
        if snapshots and snapshots[0]["state"] == "completed":
            snapshot_id = snapshots[0]["snapshot_id"]
        else:
            snapshot_id = (
                snapshots[0]["snapshot_id"]
                if snapshots
                else imaging.start_snapshot(
                    volume_size_gib=gib,
                    client_token=name,
                    tags=self._tags(label, "drill-disk", deadline),
                    description=description,
                )
            )
            written = imaging.put_snapshot_blocks(snapshot_id, blocks)
            imaging.complete_snapshot(snapshot_id, changed_blocks=written)
        self._wait(
            lambda: imaging.snapshot_state(snapshot_id)[0] != "pending", "the snapshot to complete", 3600, heartbeat
        )
        state, message = imaging.snapshot_state(snapshot_id)
        if state != "completed":
            raise SandboxError(f"The disk snapshot failed ({state}): {message or 'no reason given'}.")
        tags = self._tags(label, "drill-image", deadline)
        image_id = imaging.register_image(
            name=name,
            snapshot_id=snapshot_id,
            volume_size_gib=gib,
            boot_mode=BOOT_MODES[request.boot_mode],
            description=description,
            tags=tags,
        )
        # moto drops RegisterImage's tags; on AWS tagging again changes nothing.
        network.tag_resources([image_id], tags)
        return self._image_ready(image_id, heartbeat)

    def _image_ready(self, image_id: str, heartbeat=None) -> str:
        self._wait(lambda: imaging.image_state(image_id)[0] != "pending", "the image to be registered", 1800, heartbeat)
        state, reason = imaging.image_state(image_id)
        if state != "available":
            raise SandboxError(f"The image could not be created ({state}): {reason or 'no reason given'}.")
        return image_id

    def _wait(self, done: Callable[[], bool], what: str, timeout: float, heartbeat=None) -> None:
        until = time.monotonic() + timeout
        while not done():
            if time.monotonic() >= until:
                raise SandboxError(f"Gave up waiting for {what} after {timeout:.0f} s.")
            if heartbeat:
                heartbeat()
            time.sleep(self.poll)

    # -- one boot ----------------------------------------------------------

    def run(self, source, request: BootRequest) -> Verdict:
        """Boot the image ``source`` (its id) in a network of its own, judge it, delete the instance and network."""
        image_id = str(source)
        label = request.label
        started = time.monotonic()
        deadline = time.time() + request.time_limit + TEARDOWN_GRACE
        evidence = request.evidence_dir
        evidence.mkdir(parents=True, exist_ok=True)
        created: list[dict] = []  # {what, created}: for the drill's record of what it made
        try:
            try:
                # What an earlier try of this run left (a worker killed mid-boot).
                self.destroy(label, keep_image=True)
                vpc_id = network.create_vpc(cidr=CIDR, tags=self._tags(label, "drill-vpc", deadline))
                created.append(_made(f"VPC {vpc_id}"))
                subnet_id = network.create_subnet(
                    vpc_id=vpc_id, cidr=CIDR, tags=self._tags(label, "drill-subnet", deadline)
                )
                created.append(_made(f"subnet {subnet_id}"))
                group_id = network.create_security_group(
                    vpc_id=vpc_id,
                    name=f"reclo-{label}",
                    description="ReClo drill: admits nothing, lets nothing out",
                    tags=self._tags(label, "drill-group", deadline),
                )
                network.deny_all_egress(group_id)
                created.append(_made(f"security group {group_id}"))
                info = compute.run_instance(
                    image_id=image_id,
                    instance_type=self.instance_type,
                    subnet_id=subnet_id,
                    security_group_ids=[group_id],
                    # Per run: a retried call inside this run gets the same
                    # instance, a later run (after this one is deleted) a new one.
                    client_token=f"reclo-{label}-{uuid.uuid4().hex[:8]}",
                    tags=self._tags(label, "drill-server", deadline),
                )
                created.append(_made(f"instance {info.instance_id}"))
            except CloudError as exc:
                raise SandboxError(f"The aws sandbox could not be started: {exc}") from exc
            powered_on = time.monotonic()
            verdict = self._judge(info.instance_id, request, evidence, started, powered_on)
            verdict.details["resources"] = created
            return verdict
        finally:
            try:
                self.destroy(label, keep_image=True)
            except CloudError as exc:
                # The drill's teardown (and reap) deletes what is left; the verdict stands.
                log.warning("aws sandbox %s: teardown after the boot is incomplete: %s", label, exc)

    def _judge(self, instance_id, request, evidence, started, powered_on) -> Verdict:
        limit_at = powered_on + request.time_limit
        text, match, stopped, state = "", None, None, "pending"
        system = instance = ""
        while True:
            state = compute.describe_instance(instance_id).state
            if state not in ("pending", "running"):
                stopped = f"the instance stopped ({state}) before it was ready"
                break
            if state == "running":
                text = judge.clean(_console(instance_id))
                match = judge.scan(text, request.ready_patterns, request.failure_patterns)
                if match is not None:
                    break
            if time.monotonic() >= limit_at:
                break
            time.sleep(self.poll)
        booted = time.monotonic()
        boot_seconds = booted - powered_on
        ready = match is not None and match.kind == "ready"
        checks: list[Check] = [
            judge.boot_check(match, boot_seconds=boot_seconds, stopped=stopped, time_limit=request.time_limit)
        ]
        # AWS starts its status checks a minute or two after "running".
        while ready:
            system, instance = compute.instance_status(instance_id)
            if (system, instance) == ("ok", "ok") or "impaired" in (system, instance):
                break
            if time.monotonic() >= limit_at:
                break
            time.sleep(self.poll)
        status_ok = (system, instance) == ("ok", "ok")
        checks.append(
            Check(
                STATUS_CHECK,
                status_ok,
                f"system: {system or 'not reported'}, instance: {instance or 'not reported'}"
                if ready
                else "not read: the system did not come up",
            )
        )
        answered_after = booted - powered_on if ready else None
        checks.append(judge.limit_check(answered_after, request.time_limit))
        screenshot = _screenshot(instance_id, evidence) if state == "running" else None
        checked = time.monotonic()
        console_path = evidence / "console.log"
        console_path.write_text(text)
        details = {"boot_mode": request.boot_mode, "instance_type": self.instance_type, "instance_id": instance_id}
        details["matched"] = match.pattern.name if match else None
        if request.probe_port:
            details["not_checked"] = (
                f"port {request.probe_port}: nothing may reach the isolated subnet, the portal included"
            )
        return Verdict.judged(
            checks,
            console_excerpt=judge.excerpt(text, match),
            console_path=console_path,
            screenshot_path=screenshot,
            moments=(started, powered_on, booted, checked),
            answered_after=answered_after,
            sandbox=self.name,
            details=details,
        )

    # -- teardown ----------------------------------------------------------

    def destroy(self, label: str, *, keep_image: bool = False) -> list[str]:
        """Delete everything tagged with ``label``: instance, security group, subnet, VPC, then image and snapshot.

        Idempotent; what was deleted, in words. The instance is terminated
        and waited for (a subnet in use cannot be deleted); if it is not
        gone in time the network is left for the next call (a retried
        teardown, or :meth:`reap`) and CloudError is raised.
        """
        removed: list[str] = []
        tags = {DRILL_TAG: label}
        instances = compute.find_instances(tags)
        for info in instances:
            compute.terminate_instance(info.instance_id)
            removed.append(f"instance {info.instance_id}")
        if instances:
            until = time.monotonic() + self.terminate_wait
            while compute.find_instances(tags, states=compute.LIVE_STATES):
                if time.monotonic() >= until:
                    raise CloudError(f"the instances of {label} did not terminate in {self.terminate_wait:.0f} s")
                time.sleep(self.poll)
        for kind in ("security-group", "subnet", "vpc"):
            for resource_id in network.find_tagged(kind, tags):
                if network.delete(kind, resource_id):
                    removed.append(f"{kind.replace('-', ' ')} {resource_id}")
        if not keep_image:
            image = imaging.find_image(image_name(label))
            if image:
                imaging.delete_image(image["image_id"])
                removed.append(f"image {image['image_id']}")
            for snapshot in imaging.find_snapshots(tags):
                imaging.delete_snapshot(snapshot["snapshot_id"])
                removed.append(f"snapshot {snapshot['snapshot_id']}")
        if removed:
            log.info("aws sandbox %s: deleted %s", label, ", ".join(removed))
        return removed

    def reap(self) -> list[str]:
        """Destroy every drill whose resources' deadline passed (its worker and its teardown are gone)."""
        now = time.time()
        labels: set[str] = set()
        for kind in ("vpc", "subnet", "security-group"):
            for _, tags in network.tagged_with_key(kind, DRILL_TAG):
                if _expired(tags, now):
                    labels.add(tags[DRILL_TAG])
        for info in compute.find_instances({"reclo:managed": "true"}):
            if DRILL_TAG in info.tags and _expired(info.tags, now):
                labels.add(info.tags[DRILL_TAG])
        for _, tags in imaging.tagged_snapshots(DRILL_TAG):
            if _expired(tags, now):
                labels.add(tags[DRILL_TAG])
        removed = []
        for label in sorted(labels):
            removed += self.destroy(label)
        return removed


def _made(what: str) -> dict:
    return {"what": what, "created": datetime.now(UTC).isoformat()}


def _expired(tags: dict, now: float) -> bool:
    try:
        return float(tags.get(DEADLINE_TAG, "0")) < now
    except ValueError:
        return True


def _console(instance_id: str) -> str:
    # The whole console AWS keeps (64 KiB at most), not only its end: the
    # ready line may be followed by more.
    return compute.console_output(instance_id, limit=64 * 1024)


def _screenshot(instance_id: str, evidence: Path) -> Path | None:
    """The instance's screen as ``screenshot.png`` in ``evidence``; None when AWS gives none."""
    try:
        jpeg = compute.console_screenshot(instance_id)
    except CloudError as exc:  # not every instance type has one, nor every emulator
        log.info("no console screenshot of %s: %s", instance_id, exc)
        return None
    if not jpeg:
        return None
    from PIL import Image, UnidentifiedImageError  # Pillow: what reportlab reads images with anyway

    target = evidence / "screenshot.png"
    try:
        with Image.open(io.BytesIO(jpeg)) as image:
            image.save(target, format="PNG")
    except (UnidentifiedImageError, OSError) as exc:
        log.info("the console screenshot of %s is not an image: %s", instance_id, exc)
        return None
    return target
