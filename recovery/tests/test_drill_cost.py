"""The aws drill's cost estimate: the pure pricing, reading a drill's record, and the evidence showing it."""

import json
import subprocess
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from reclo_site import testing
from recovery import drill_report, sizes
from recovery.drill_cost import GiB, Usage, estimate, usage_of
from recovery.models import Drill

T0 = datetime(2026, 12, 2, 9, 0, tzinfo=UTC)


def _at(minutes: float) -> str:
    return (T0 + timedelta(minutes=minutes)).isoformat()


def test_each_part_is_priced_at_the_list_prices_and_the_total_is_to_the_cent():
    usage = Usage(
        instance_type="t3.medium", instance_seconds=360, volume_gib=8,
        snapshot_bytes=2 * GiB, snapshot_seconds=900, put_blocks=4096,
    )  # fmt: skip
    result = estimate(usage)
    month = Decimal(30 * 24 * 3600)
    assert [p.usd for p in result.parts] == [
        Decimal("0.0416") * 360 / 3600,  # t3.medium's hourly price for 6 minutes
        Decimal("0.08") * 8 * 360 / month,  # 8 GiB of gp3 for as long
        Decimal("0.05") * 2 * 900 / month,  # 2 GiB of snapshot for 15 minutes
        Decimal("0.006") * Decimal("4.096"),  # 4,096 blocks at $0.006 per 1,000
    ]
    assert result.total == Decimal("0.03")  # 0.02886 rounded
    assert result.text() == (
        "Estimated cost: $0.03 (instance t3.medium 6 min $0.0042, its 8 GiB gp3 disk under $0.0001, "
        "snapshot 2.0 GiB held 15 min under $0.0001, 4,096 PutSnapshotBlock calls $0.0246)"
    )


def test_the_prices_are_the_published_ones_next_to_the_instance_sizes():
    assert sizes.EBS_PUT_SNAPSHOT_BLOCK_PER_1000_USD == Decimal("0.006")
    assert sizes.EBS_SNAPSHOT_GB_MONTH_USD == Decimal("0.05") and sizes.EBS_GP3_GB_MONTH_USD == Decimal("0.08")


def test_an_instance_is_billed_a_minute_at_least():
    result = estimate(Usage("t3.small", 10, 1, 0, 0, 0))
    assert result.parts[0].what == "instance t3.small 1 min"
    assert result.parts[0].usd == Decimal("0.0208") / 60
    assert result.text().startswith("Estimated cost: under $0.01 (instance t3.small 1 min $0.0003,")


def test_an_instance_type_without_a_list_price_is_named_and_not_counted():
    result = estimate(Usage("c7i.large", 3600, 0, 0, 0, 1000))
    assert result.parts[0].usd is None and result.total == Decimal("0.01")  # the 1,000 blocks only
    assert "instance c7i.large 1 h 0 min (no price known, not counted)" in result.text()


def test_a_drill_that_made_nothing_cost_nothing():
    assert estimate(Usage("t3.small", 0, 0, 0, 0, 0)).text() == "Estimated cost: $0.00 (nothing billable was made)"


def test_the_usage_is_read_from_the_resources_times_and_the_steps_outputs():
    resources = [
        {"what": "snapshot snap-1", "created": _at(0), "removed": _at(20)},
        {"what": "image ami-1", "created": _at(0), "removed": _at(20)},
        {"what": "VPC vpc-1", "created": _at(5), "removed": _at(20)},
        {"what": "instance i-1", "created": _at(6), "removed": _at(12)},
    ]
    prepared = {"image_id": "ami-1", "volume_gib": 8, "blocks_written": 300}
    booted = {"verdict": {"details": {"instance_type": "t3.medium"}}}
    usage = usage_of(resources, prepared, booted, instance_type="t3.small", boot_span=(None, None), now=_at_dt(60))
    assert usage == Usage("t3.medium", 360.0, 8, 300 * 512 * 1024, 1200.0, 300)


def test_what_the_record_lacks_is_taken_from_the_boot_step_and_now():
    resources = [
        # The placeholder of a prepare that never named its snapshot, still there at the report.
        {"what": "EBS snapshot and image reclo-drill-x", "created": _at(0), "removed": None},
        # Found by the teardown after a failed boot: no launch time on record.
        {"what": "instance i-2", "created": None, "removed": _at(30)},
    ]
    usage = usage_of(
        resources, {"volume_gib": 1, "blocks_written": 5000}, {},
        instance_type="t3.small", boot_span=(T0 + timedelta(minutes=10), T0 + timedelta(minutes=14)), now=_at_dt(45),
    )  # fmt: skip
    assert usage.instance_type == "t3.small" and usage.instance_seconds == 20 * 60  # boot start to its removal
    assert usage.snapshot_seconds == 45 * 60
    assert usage.snapshot_bytes == GiB  # written again on a resumed try: no more than the disk holds
    assert usage.put_blocks == 5000  # but every call is billed


def _at_dt(minutes: float) -> datetime:
    return T0 + timedelta(minutes=minutes)


@pytest.mark.django_db
def test_the_evidence_of_an_aws_drill_shows_the_estimate_and_a_local_one_none(chain, tmp_path):
    from .test_drill_pages import finished_drill

    testing.require_tool("pdftotext")
    drill = finished_drill(
        chain[0][-1], passed=True, sandbox="aws",
        resources=[
            {"what": "snapshot snap-1", "created": _at(0), "removed": _at(14)},
            {"what": "instance i-1", "created": _at(7), "removed": _at(13)},
        ],
    )  # fmt: skip
    drill.steps.filter(name="preparing").update(outputs={"image_id": "ami-1", "volume_gib": 8, "blocks_written": 4096})
    drill.steps.filter(name="booting").update(outputs={"verdict": {"details": {"instance_type": "t3.medium"}}})
    drill = Drill.objects.get(pk=drill.pk)
    cost = drill_report.drill_facts(drill)["cost"]
    assert (cost["amount"], cost["estimated"]) == ("0.03", True)
    assert [p["what"] for p in cost["parts"]] == [
        "instance t3.medium 6 min",
        "its 8 GiB gp3 disk",
        "snapshot 2.0 GiB held 14 min",
        "4,096 PutSnapshotBlock calls",
    ]
    assert cost["note"].startswith("Estimated cost: $0.03 (instance t3.medium 6 min $0.0042,")
    assert f"reclo:drill=drill-{drill.pk}" in cost["note"]
    json.dumps(cost)  # as the stored report.json holds it
    pdf = tmp_path / "report.pdf"
    pdf.write_bytes(drill_report.render_pdf(drill))
    text = " ".join(
        subprocess.run(["pdftotext", str(pdf), "-"], capture_output=True, text=True, check=True).stdout.split()
    )
    assert "Estimated cost: $0.03 (instance t3.medium 6 min $0.0042," in text

    local = drill_report.drill_facts(finished_drill(chain[0][-1], passed=True))["cost"]
    assert (local["amount"], local["estimated"], local["parts"]) == ("0.00", False, [])
