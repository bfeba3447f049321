"""Each failover step against moto: what it makes, when it skips, how it fails, how it resumes."""

import time
from unittest import mock

import pytest
from moto.core import DEFAULT_ACCOUNT_ID
from moto.ebs.models import ebs_backends
from reclo_agent.vhd import ChainReader, VHDReader

from backups.models import Backup
from reclo_site import cloud
from reclo_site.cloud import CloudPermanentError, compute, imaging, network, storage
from reclo_site.cloud.compute import InstanceInfo
from recovery import engine, paths, services, snapshot_write, steps
from recovery.models import Instance, Recovery, RecoveryNetwork, RecoveryStep, VpnGateway

from .cloud_inventory import inventory
from .factories import MiB, backup_chain, make_disk, store_full

pytestmark = pytest.mark.django_db

ONE_OF_EACH = {"servers": 1, "gateways": 1, "images": 1, "snapshots": 1, "addresses": 2, "vpcs": 1}


@pytest.fixture
def recovery(chain, user):
    return services.recovery_start(user=user, backup_id=chain[0][-1].pk)


@pytest.fixture
def merged(chain, user):
    """A failover by VM Import, the one path that still needs the merged disk in storage."""
    return services.recovery_start(user=user, backup_id=chain[0][-1].pk, import_method="vm_import")


def outputs(recovery, step):
    return RecoveryStep.objects.get(recovery=recovery, name=step).outputs


# --- consolidating ------------------------------------------------------------------------------


def test_consolidating_merges_the_chain_into_one_dynamic_vhd_in_storage(merged, chain, drive):
    recovery = merged
    _backups, top = chain
    drive(recovery.pk, until="importing")
    out = outputs(recovery, "consolidating")
    assert out["image_key"] == f"images/{recovery.user_id}/{recovery.backup_ref}.vhd"
    assert out["layers"] == 3
    merged = VHDReader(storage.ObjectReader(out["image_key"]))
    assert merged.info.disk_type == "dynamic"
    assert merged.virtual_size == len(top)
    assert ChainReader([merged]).read(0, len(top)) == top
    assert storage.head_object(out["image_key"])["size"] == out["image_size"]


def test_a_chain_written_over_after_verification_still_fails_over_to_the_verified_disk(merged, user, chain, drive):
    # The attack: the server's upload credentials write the full's key again
    # with another valid disk. The failover must never build from it, by either path.
    backups, top = chain
    storage.put_object(backups[0].key, store_full(make_disk(8 * MiB, seed=66)).data)
    drive(merged.pk, until="importing")
    disk = VHDReader(storage.ObjectReader(outputs(merged, "consolidating")["image_key"]))
    assert ChainReader([disk]).read(0, len(top)) == top
    Recovery.objects.filter(pk=merged.pk).update(status="failed")
    recovery = services.recovery_start(user=user, backup_id=backups[-1].pk, import_method="ebs_direct")
    drive(recovery.pk, until="launching")  # EBS direct, straight from the chain
    assert snapshot_disk(outputs(recovery, "importing")["snapshot_id"], len(top)) == top


def snapshot_disk(snapshot_id: str, size: int) -> bytes:
    """A snapshot's disk read back through ListSnapshotBlocks and GetSnapshotBlock (moto implements both)."""
    disk = bytearray(size)
    for index, data in imaging.snapshot_blocks(snapshot_id):
        disk[index * imaging.EBS_BLOCK_SIZE : (index + 1) * imaging.EBS_BLOCK_SIZE] = data
    return bytes(disk)


def test_a_chain_changed_under_its_etag_pin_fails_the_failover_with_the_reason(recovery, chain, drive):
    backups, _top = chain
    Backup.objects.filter(pk=backups[1].pk).update(version_id="")  # verified on an unversioned bucket
    storage.put_object(backups[1].key, b"tampered")
    drive(recovery.pk)
    recovery.refresh_from_db()
    assert (recovery.status, recovery.error_code) == ("failed", 403)
    assert "not the one that was verified" in recovery.error


def test_consolidating_is_skipped_when_the_merged_disk_exists(merged, chain, user, drive):
    recovery = merged
    drive(recovery.pk, until="importing")
    Recovery.objects.filter(pk=recovery.pk).update(status="failed")
    again = services.recovery_start(user=user, backup_id=chain[0][-1].pk, import_method="vm_import")
    with mock.patch.object(steps, "merge_chain", side_effect=AssertionError("merged again")):
        drive(again.pk, until="importing")
    step = again.steps.get(name="consolidating")
    assert step.status == "skipped"
    assert step.outputs["image_key"] == outputs(recovery, "consolidating")["image_key"]


def test_consolidating_an_earlier_restore_point_stops_at_it(chain, user, drive):
    backups, _ = chain
    for method in ("vm_import", "ebs_direct"):
        recovery = services.recovery_start(user=user, backup_id=backups[0].pk, import_method=method)
        drive(recovery.pk, until="importing")
        assert outputs(recovery, "consolidating")["layers"] == 1
        Recovery.objects.filter(pk=recovery.pk).update(status="failed")


def test_consolidating_fails_with_401_when_a_layer_is_missing_from_storage(recovery, chain, drive):
    storage.delete_object(chain[0][1].key)
    recovery = drive(recovery.pk)
    assert (recovery.status, recovery.error_code) == ("failed", 401)
    assert "missing from storage" in recovery.error


def test_consolidating_fails_with_403_when_a_layer_is_damaged(recovery, chain, drive):
    # The verified version itself is bad (a verifier bug, say): the version the row pins.
    stored = storage.put_object(chain[0][1].key, b"this is not seekable zstd at all" * 10)
    Backup.objects.filter(pk=chain[0][1].pk).update(**stored)
    recovery = drive(recovery.pk)
    assert (recovery.status, recovery.error_code) == ("failed", 403)
    assert "damaged" in recovery.error


def test_consolidating_fails_with_401_when_a_parent_is_no_longer_verified(recovery, chain, drive):
    Backup.objects.filter(pk=chain[0][0].pk).update(status=Backup.Status.FAILED)
    recovery = drive(recovery.pk)
    assert (recovery.status, recovery.error_code) == ("failed", 401)
    assert "not verified" in recovery.error


def test_consolidating_aborts_the_upload_a_dead_worker_left(merged, drive):
    recovery = merged
    key = steps.merged_key(recovery)
    writer = storage.ObjectWriter(key)
    writer.write(b"x" * 100)  # a worker died after starting the upload
    assert storage.multipart_uploads(prefix=key, key=key)
    drive(recovery.pk, until="importing")
    assert storage.multipart_uploads(prefix=key, key=key) == []


# --- importing: EBS direct ----------------------------------------------------------------------


def test_ebs_direct_writes_the_disks_non_zero_blocks_and_registers_an_image(recovery, chain, drive):
    _backups, top = chain
    registered = []

    def spy(params, **_):  # moto ignores RegisterImage's block-device mapping: check what we sent
        registered.append(dict(params))

    events = imaging.client("ec2").meta.events
    events.register("provide-client-params.ec2.RegisterImage", spy)
    try:
        drive(recovery.pk, until="launching")
    finally:
        events.unregister("provide-client-params.ec2.RegisterImage", spy)
    out = outputs(recovery, "importing")
    blocks = ebs_backends[DEFAULT_ACCOUNT_ID]["us-east-1"].snapshots[out["snapshot_id"]].blocks
    size = imaging.EBS_BLOCK_SIZE
    expected = {
        n: top[n * size : (n + 1) * size] for n in range(len(top) // size) if any(top[n * size : (n + 1) * size])
    }
    assert {n: b.block_data for n, b in blocks.items()} == expected
    assert out["changed_blocks"] == len(expected)
    assert imaging.snapshot_state(out["snapshot_id"])[0] == "completed"
    assert imaging.image_state(out["image_id"])[0] == "available"
    (params,) = registered
    assert params["Name"] == f"reclo-{recovery.pk}"
    assert params["BlockDeviceMappings"][0]["Ebs"]["SnapshotId"] == out["snapshot_id"]
    assert params["BlockDeviceMappings"][0]["Ebs"]["VolumeSize"] == 1
    assert params["RootDeviceName"] == params["BlockDeviceMappings"][0]["DeviceName"]
    # moto ignores both: what was sent is checked here. No preflight report: legacy BIOS.
    assert (params["BootMode"], params["EnaSupport"]) == ("legacy-bios", True)


def test_ebs_direct_registers_a_uefi_server_in_uefi_mode(recovery, drive, monkeypatch):
    monkeypatch.setattr(paths, "_preflight", lambda server: {"boot_mode": "uefi", "kernel": "6.1.0-13-amd64"})
    registered = []

    def spy(params, **_):
        registered.append(dict(params))

    events = imaging.client("ec2").meta.events
    events.register("provide-client-params.ec2.RegisterImage", spy)
    try:
        drive(recovery.pk, until="launching")
    finally:
        events.unregister("provide-client-params.ec2.RegisterImage", spy)
    assert [(p["BootMode"], p["EnaSupport"]) for p in registered] == [("uefi", True)]


def test_ebs_direct_merges_the_chain_straight_into_the_snapshot_with_no_copy(recovery, chain, drive, monkeypatch):
    _backups, top = chain
    in_flight, peak = [0], [0]
    real = imaging.put_snapshot_block

    def counting(*args):
        in_flight[0] += 1
        peak[0] = max(peak[0], in_flight[0])
        try:
            time.sleep(0.01)  # long enough for the other writers to start theirs
            return real(*args)
        finally:
            in_flight[0] -= 1

    monkeypatch.setattr(imaging, "put_snapshot_block", counting)
    drive(recovery.pk, until="launching")
    out = outputs(recovery, "importing")
    assert outputs(recovery, "consolidating") == {"direct": True, "layers": 3}
    # Read back through EBS direct's own read API (ListSnapshotBlocks, GetSnapshotBlock; moto implements both).
    disk = bytearray(len(top))
    size = imaging.EBS_BLOCK_SIZE
    indices = []
    for index, data in imaging.snapshot_blocks(out["snapshot_id"]):
        indices.append(index)
        assert any(data), f"block {index} is all zeros: it should not have been written"
        disk[index * size : (index + 1) * size] = data
    assert bytes(disk) == top
    assert len(indices) == out["changed_blocks"]
    assert peak[0] > 1  # several PutSnapshotBlock in flight
    with pytest.raises(cloud.ObjectNotFound):  # no merged object in S3, nor parts of one
        storage.head_object(steps.merged_key(recovery))
    assert storage.multipart_uploads(prefix=steps.IMAGES_PREFIX) == []


def sent_params(service: str, operation: str) -> list:
    """The parameters our adapter sends to `operation` (moto ignores some of them, so we look at the request)."""
    from reclo_site.cloud import clients

    seen = []
    clients.client(service).meta.events.register(
        f"provide-client-params.{service}.{operation}", lambda params, **_: seen.append(dict(params))
    )
    return seen


@pytest.mark.parametrize("kms_key", ["", "arn:aws:kms:us-east-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab"])
def test_ebs_direct_snapshots_are_encrypted(recovery, drive, settings, kms_key):
    # moto's StartSnapshot ignores Encrypted and KmsKeyArn (its own docstring
    # says so), so the test checks what the adapter asks AWS for.
    settings.RECLO_KMS_KEY_ID = kms_key
    started = sent_params("ebs", "StartSnapshot")
    drive(recovery.pk, until="launching")
    (params,) = started
    assert params["Encrypted"] is True
    assert params.get("KmsKeyArn", "") == kms_key  # none: the account's default EBS key


def test_ebs_direct_resumes_from_its_checkpoint(recovery, chain, drive, monkeypatch):
    _backups, top = chain
    # One span, one write at a time, a checkpoint after every block: the checkpoint is exactly known.
    monkeypatch.setattr(snapshot_write, "READERS", 1)
    monkeypatch.setattr(snapshot_write, "PUTS", 1)
    monkeypatch.setattr(snapshot_write, "CHECKPOINT_BLOCKS", 1)
    per = 2 * MiB // imaging.EBS_BLOCK_SIZE
    allocated = sorted({i // per for i in range(len(top) // imaging.EBS_BLOCK_SIZE) if any(_ebs(top, i))})
    assert len(allocated) >= 3
    victim = allocated[2]
    real = imaging.put_snapshot_block
    written, killed = [], []

    def die_in_third_block(snapshot_id, index, data):
        if index // per == victim and not killed:
            killed.append(index)
            raise Killed("worker killed mid-write")
        real(snapshot_id, index, data)
        written.append(index)

    monkeypatch.setattr(imaging, "put_snapshot_block", die_in_third_block)
    with pytest.raises(Killed):
        drive(recovery.pk)
    ((first, end, next_block, pieces),) = outputs(recovery, "importing")["spans"]
    assert (first, next_block) == (0, victim)
    assert pieces == len([i for i in written if i // per < victim])
    written.clear()
    drive(recovery.pk, until="launching")
    # Only the blocks from the checkpoint on were written again.
    assert written and min(written) // per >= victim
    assert inventory()["snapshots"] == 1
    out = outputs(recovery, "importing")
    assert snapshot_disk(out["snapshot_id"], len(top)) == top
    assert out["changed_blocks"] == sum(1 for i in range(len(top) // imaging.EBS_BLOCK_SIZE) if any(_ebs(top, i)))


def test_ebs_direct_spans_resume_each_from_its_own_checkpoint(aws, user, server, drive, monkeypatch):
    _backups, top = backup_chain(user=user, server=server, size=16 * MiB, incrementals=2)
    recovery = services.recovery_start(user=user, backup_id=_backups[-1].pk)
    monkeypatch.setattr(snapshot_write, "READERS", 2)
    monkeypatch.setattr(snapshot_write, "CHECKPOINT_BLOCKS", 1)
    per = 2 * MiB // imaging.EBS_BLOCK_SIZE
    real = imaging.put_snapshot_block
    written, calls = [], []

    def die_after_ten(snapshot_id, index, data):
        calls.append(index)
        if len(calls) == 10:
            raise Killed("worker killed mid-write")
        real(snapshot_id, index, data)
        written.append(index)

    monkeypatch.setattr(imaging, "put_snapshot_block", die_after_ten)
    with pytest.raises(Killed):
        drive(recovery.pk)
    spans = outputs(recovery, "importing")["spans"]
    assert len(spans) == 2 and spans[0][1] == spans[1][0]
    before = set(written)
    written.clear()
    drive(recovery.pk, until="launching")
    for index in written:  # nothing below a span's checkpoint is written again
        span = next(s for s in spans if s[0] <= index // per < s[1])
        assert index // per >= span[2]
    assert before | set(written) >= {i for i in range(len(top) // imaging.EBS_BLOCK_SIZE) if any(_ebs(top, i))}
    assert inventory()["snapshots"] == 1
    assert snapshot_disk(outputs(recovery, "importing")["snapshot_id"], len(top)) == top


def _ebs(disk: bytes, index: int) -> bytes:
    return disk[index * imaging.EBS_BLOCK_SIZE : (index + 1) * imaging.EBS_BLOCK_SIZE]


def test_ebs_direct_fails_with_403_when_the_snapshot_fails(recovery, drive, monkeypatch):
    monkeypatch.setattr(imaging, "snapshot_state", lambda sid: ("error", "disk unreadable"))
    recovery = drive(recovery.pk)
    assert (recovery.status, recovery.error_code) == ("failed", 403)
    assert "disk unreadable" in recovery.error


def test_ebs_direct_waits_for_a_pending_image_then_fails_a_failed_one(recovery, drive, monkeypatch):
    states = iter([("pending", ""), ("failed", "InvalidSnapshot")])
    monkeypatch.setattr(imaging, "image_state", lambda image_id: next(states))
    drive(recovery.pk, until="importing")
    engine.run_step(recovery.pk, "importing")
    step = recovery.steps.get(name="importing")
    assert step.status == "waiting" and "registering" in step.detail
    recovery = drive(recovery.pk)
    assert (recovery.status, recovery.error_code) == ("failed", 403)
    assert "InvalidSnapshot" in recovery.error


# --- launching ----------------------------------------------------------------------------------


def test_launching_starts_the_server_in_the_tenants_network_with_an_address(recovery, user, drive):
    drive(recovery.pk, until="provisioning_vpn")
    instance = Instance.objects.get(recovery=recovery)
    net = RecoveryNetwork.objects.get(user=user)
    info = compute.describe_instance(instance.instance_id)
    assert info.state == "running"
    assert info.image_id == outputs(recovery, "importing")["image_id"]
    assert info.instance_type == recovery.instance_type == "t3.medium"  # derived from the 8 MiB disk
    assert info.tags["reclo:recovery"] == str(recovery.pk) and info.tags["reclo:managed"] == "true"
    assert info.private_ip.startswith("10.213.1.")
    assert instance.private_ip == info.private_ip and instance.public_ip == info.public_ip
    address = compute.describe_address(instance.allocation_id)
    assert address.instance_id == instance.instance_id
    assert net.ready and net.vpc_id and net.subnet_id
    assert compute.describe_instances([instance.instance_id])[instance.instance_id].private_ip.startswith("10.213.")


def test_the_network_is_made_once_per_tenant_and_reused(recovery, user, other_user, drive):
    drive(recovery.pk)
    second_chain, _ = backup_chain(user=user, size=4 * MiB, incrementals=0, seed=7)
    second = drive(services.recovery_start(user=user, backup_id=second_chain[-1].pk).pk)
    assert second.status == "ready"
    assert inventory(tenant=user.pk)["vpcs"] == 1
    assert inventory(tenant=user.pk)["gateways"] == 1  # one VPN gateway for the tenant
    assert (
        outputs(second, "provisioning_vpn")["gateway_instance_id"]
        == outputs(recovery, "provisioning_vpn")["gateway_instance_id"]
    )
    theirs, _ = backup_chain(user=other_user, size=4 * MiB, incrementals=0, seed=8)
    drive(services.recovery_start(user=other_user, backup_id=theirs[-1].pk).pk)
    assert inventory(tenant=other_user.pk)["vpcs"] == 1
    assert RecoveryNetwork.objects.get(user=user).vpc_id != RecoveryNetwork.objects.get(user=other_user).vpc_id


def test_a_deleted_security_group_is_recreated_before_the_next_failover_uses_it(recovery, user, drive):
    drive(recovery.pk)
    net = RecoveryNetwork.objects.get(user=user)
    old_group, old_vpc = net.server_group_id, net.vpc_id
    ec2 = network.client("ec2")
    ec2.delete_security_group(GroupId=old_group)  # deleted by hand in the console
    assert not network.exists("security-group", old_group)
    second_chain, _ = backup_chain(user=user, size=4 * MiB, incrementals=0, seed=7)
    second = drive(services.recovery_start(user=user, backup_id=second_chain[-1].pk).pk)
    assert second.status == "ready", second.error
    net.refresh_from_db()
    assert net.server_group_id != old_group and network.exists("security-group", net.server_group_id)
    assert net.vpc_id == old_vpc  # the VPC was still there: kept
    server = compute.describe_instance(outputs(second, "launching")["instance_id"])
    groups = ec2.describe_instances(InstanceIds=[server.instance_id])["Reservations"][0]["Instances"][0]
    assert [g["GroupId"] for g in groups["SecurityGroups"]] == [net.server_group_id]
    # The rebuilt group lets the gateway in again.
    assert any(
        pair.get("GroupId") == net.gateway_group_id
        for rule in network.ingress_rules(net.server_group_id)
        for pair in rule.get("UserIdGroupPairs", [])
    )


def test_a_deleted_subnet_is_recreated_in_the_same_vpc(recovery, user, drive):
    drive(recovery.pk)
    net = RecoveryNetwork.objects.get(user=user)
    old_subnet, old_vpc = net.subnet_id, net.vpc_id
    ec2 = network.client("ec2")
    in_subnet = ec2.describe_instances(Filters=[{"Name": "subnet-id", "Values": [old_subnet]}])["Reservations"]
    ec2.terminate_instances(InstanceIds=[i["InstanceId"] for r in in_subnet for i in r["Instances"]])
    ec2.delete_subnet(SubnetId=old_subnet)  # deleted by hand, with what ran in it
    second_chain, _ = backup_chain(user=user, size=4 * MiB, incrementals=0, seed=8)
    second = drive(services.recovery_start(user=user, backup_id=second_chain[-1].pk).pk)
    assert second.status == "ready", second.error
    net.refresh_from_db()
    assert net.subnet_id != old_subnet and network.exists("subnet", net.subnet_id)
    assert net.vpc_id == old_vpc
    server = ec2.describe_instances(InstanceIds=[outputs(second, "launching")["instance_id"]])
    assert server["Reservations"][0]["Instances"][0]["SubnetId"] == net.subnet_id


def test_a_network_whose_vpc_is_gone_is_rebuilt_whole(recovery, user, drive):
    vpc_id = "vpc-0123456789abcdef0"  # saved by an earlier failover; since deleted
    RecoveryNetwork.objects.create(
        user=user,
        vpc_id=vpc_id,
        igw_id="igw-0123456789abcdef0",
        subnet_id="subnet-0123456789abcdef0",
        route_table_id="rtb-0123456789abcdef0",
        server_group_id="sg-0123456789abcdef0",
        gateway_group_id="sg-0123456789abcdef1",
        ready=True,
    )
    recovery = drive(recovery.pk)
    assert recovery.status == "ready", recovery.error
    net = RecoveryNetwork.objects.get(user=user)
    assert net.ready and net.vpc_id != vpc_id
    for field, kind in (("vpc_id", "vpc"), ("subnet_id", "subnet"), ("server_group_id", "security-group")):
        assert network.exists(kind, getattr(net, field)), field
    assert inventory(tenant=user.pk)["vpcs"] == 1


def test_launching_waits_while_the_server_boots(recovery, drive, monkeypatch):
    real = compute.describe_instance
    booting = iter([True, True])

    def scripted(instance_id):  # moto jumps straight to "running"
        info = real(instance_id)
        if next(booting, False):
            return InstanceInfo(instance_id=instance_id, state="pending", instance_type=info.instance_type)
        return info

    monkeypatch.setattr(compute, "describe_instance", scripted)
    drive(recovery.pk, until="launching")
    assert engine.run_step(recovery.pk, "launching") == "waiting"
    assert recovery.steps.get(name="launching").detail == "The server is booting."
    assert engine.run_step(recovery.pk, "launching") == "waiting"
    assert drive(recovery.pk).status == "ready"
    assert inventory()["servers"] == 1


def test_launching_fails_with_404_when_the_server_does_not_start(recovery, drive, monkeypatch):
    monkeypatch.setattr(
        compute,
        "describe_instance",
        lambda iid: InstanceInfo(iid, "terminated", "t3.medium", state_reason="Server.InsufficientInstanceCapacity"),
    )
    recovery = drive(recovery.pk)
    assert (recovery.status, recovery.error_code) == ("failed", 404)
    assert "InsufficientInstanceCapacity" in recovery.error


def test_launching_fails_with_404_when_the_cloud_refuses_the_instance(recovery, drive, monkeypatch):
    refusal = CloudPermanentError("launch: Unsupported The requested configuration is not supported", "Unsupported")
    monkeypatch.setattr(compute, "run_instance", mock.Mock(side_effect=refusal))
    recovery = drive(recovery.pk)
    assert (recovery.status, recovery.error_code) == ("failed", 404)
    assert Instance.objects.count() == 0


# --- provisioning_vpn ---------------------------------------------------------------------------


def test_the_vpn_gateway_is_configured_by_user_data_and_only_it_takes_wireguard(recovery, user, drive):
    from recovery import devices, vpn

    device = devices.device_create(user=user, name="Reception PC")
    drive(recovery.pk)
    gateway = VpnGateway.objects.get(network__user=user)
    net = gateway.network
    info = compute.describe_instance(gateway.instance_id)
    assert info.state == "running" and info.tags["reclo:role"] == "vpn-gateway"
    data = compute.user_data(gateway.instance_id)
    assert f"PrivateKey = {vpn.decrypt(gateway.gateway_private_key_enc)}" in data
    # The devices known at launch are peers from the start; later ones come through the peer sync.
    assert f"PublicKey = {device.public_key}\nAllowedIPs = {device.address}/32\n" in data
    assert vpn.hash_agent_token(data.split("RECLO_GATEWAY_TOKEN=")[1].split()[0]) == gateway.agent_token_hash
    assert vpn.public_key_of(vpn.decrypt(gateway.gateway_private_key_enc)) == gateway.gateway_public_key
    assert gateway.public_ip and gateway.state == "ready"

    gateway_rules = network.ingress_rules(net.gateway_group_id)
    assert [(r["IpProtocol"], r.get("FromPort"), r.get("ToPort"), [x["CidrIp"] for x in r["IpRanges"]]) for r in
            gateway_rules] == [("udp", 51820, 51820, ["0.0.0.0/0"])]  # fmt: skip
    server_rules = network.ingress_rules(net.server_group_id)
    assert len(server_rules) == 1
    assert server_rules[0]["IpProtocol"] == "-1" and server_rules[0]["IpRanges"] == []
    assert [p["GroupId"] for p in server_rules[0]["UserIdGroupPairs"]] == [net.gateway_group_id]
    server = compute.describe_instance(Instance.objects.get().instance_id)
    assert server.tags["reclo:role"] == "server"


def test_provisioning_vpn_fails_with_407_when_the_gateway_cannot_be_made(recovery, drive, settings):
    settings.RECLO_VPN_GATEWAY_AMI_PARAMETER = "/aws/service/no-such-parameter"
    recovery = drive(recovery.pk)
    assert (recovery.status, recovery.error_code) == ("failed", 407)
    assert inventory()["gateways"] == 0


def test_a_gateway_that_vanished_is_replaced_with_new_keys(recovery, user, drive):
    drive(recovery.pk)
    gateway = VpnGateway.objects.get()
    old_instance, old_key = gateway.instance_id, gateway.gateway_public_key
    compute.terminate_instance(old_instance)
    second_chain, _ = backup_chain(user=user, size=4 * MiB, incrementals=0, seed=9)
    drive(services.recovery_start(user=user, backup_id=second_chain[-1].pk).pk)
    gateway.refresh_from_db()
    assert gateway.instance_id != old_instance and gateway.gateway_public_key != old_key
    assert gateway.generation == 2
    assert inventory()["gateways"] == 1


# --- the whole pipeline: duplicates and crashes -------------------------------------------------


class Killed(BaseException):
    """A worker killed mid-step: nothing after this point ran, not even except clauses."""


def test_every_step_delivered_twice_makes_one_of_everything(recovery, user):
    for step in Recovery.STEPS:
        first = engine.run_step(recovery.pk, step)
        second = engine.run_step(recovery.pk, step)
        assert (first, second) == ("done", "not claimed"), step
    recovery.refresh_from_db()
    assert recovery.status == "ready"
    assert inventory() == ONE_OF_EACH
    assert [s.attempts for s in recovery.steps.all()] == [1, 1, 1, 1]


@pytest.mark.parametrize(
    ("module", "name", "nth"),
    [
        (imaging, "put_snapshot_block", 3),  # mid-write
        (imaging, "start_snapshot", 1),
        (imaging, "complete_snapshot", 1),
        (imaging, "register_image", 1),
        (network, "create_vpc", 1),
        (network, "create_security_group", 2),
        (compute, "run_instance", 1),  # the server
        (compute, "allocate_address", 1),  # the server's address
        (compute, "run_instance", 2),  # the VPN gateway
        (compute, "allocate_address", 2),  # the gateway's address
    ],
    ids=lambda v: v if isinstance(v, str | int) else v.__name__.rsplit(".", 1)[-1],
)
def test_a_worker_killed_right_after_a_create_leaves_no_duplicate(recovery, drive, monkeypatch, module, name, nth):
    real = getattr(module, name)
    calls = []

    def then_die(*args, **kwargs):
        result = real(*args, **kwargs)
        calls.append(name)
        if len(calls) == nth:
            raise Killed(f"killed after {name}")  # before the id was saved
        return result

    monkeypatch.setattr(module, name, then_die)
    with pytest.raises(Killed):
        drive(recovery.pk)
    recovery = drive(recovery.pk)  # another worker takes over once the lease runs out
    assert recovery.status == "ready", recovery.error
    assert inventory() == ONE_OF_EACH
    assert Instance.objects.count() == 1 and VpnGateway.objects.count() == 1


def test_the_one_pass_write_reads_each_layer_with_a_few_bounded_gets(aws, user, server, drive):
    # The whole point of the one-pass write's reader: a handful of long GETs
    # per layer whatever the disk's size (the metadata once, then one per
    # span), never one per few MiB of disk.
    backups, top = backup_chain(user=user, server=server, size=48 * MiB, incrementals=2)
    recovery = services.recovery_start(user=user, backup_id=backups[-1].pk)
    gets = sent_params("s3", "GetObject")
    drive(recovery.pk, until="launching")
    per_key = {b.key: [g["Range"] for g in gets if g["Key"] == b.key] for b in backups}
    for key, ranges in per_key.items():
        assert ranges, key
        assert len(ranges) <= 2 + snapshot_write.READERS, (key, ranges)
        assert all(r.startswith("bytes=") and r.split("-")[1] for r in ranges)  # bounded ranges only
    assert snapshot_disk(outputs(recovery, "importing")["snapshot_id"], len(top)) == top


def test_the_vpn_step_waits_for_the_gateways_first_report(recovery, user, drive, settings, client):
    from recovery import vpn

    settings.RECLO_VPN_GATEWAY_MUST_REPORT = True
    from recovery import engine

    drive(recovery.pk, until="provisioning_vpn")
    Recovery.objects.filter(pk=recovery.pk).update(lease_until=None, lease_token=None)
    engine.run_step(recovery.pk, "provisioning_vpn")
    step = RecoveryStep.objects.get(recovery=recovery, name="provisioning_vpn")
    assert step.status == "waiting" and "report" in step.detail
    gateway = VpnGateway.objects.get(network__user=user)
    response = client.post("/api/v1/vpn/gateway/peers", "", content_type="text/plain",
                           HTTP_AUTHORIZATION=f"Gateway {vpn.decrypt(gateway.agent_token_enc)}")  # fmt: skip
    assert response.status_code == 200
    assert drive(recovery.pk).status == "ready"


def test_a_gateway_that_never_reports_fails_the_step_with_407_and_its_console(recovery, user, drive, settings):
    from datetime import timedelta

    settings.RECLO_VPN_GATEWAY_MUST_REPORT = True
    settings.RECLO_VPN_GATEWAY_REPORT_DEADLINE = timedelta(0)
    recovery = drive(recovery.pk)
    assert (recovery.status, recovery.error_code) == ("failed", 407)
    gateway = VpnGateway.objects.get(network__user=user)
    assert f"The VPN gateway {gateway.instance_id} did not report" in recovery.error
    assert "console" in recovery.error


@pytest.mark.parametrize(
    ("allocated", "total", "count"),
    [([], 10, 4), ([3], 10, 4), (list(range(0, 100, 3)), 100, 4), ([0, 1, 2, 97, 98, 99], 100, 3), ([5, 6], 8, 8)],
)
def test_spans_cover_the_disk_with_equal_shares_of_its_stored_blocks(allocated, total, count):
    from array import array

    spans = snapshot_write.plan_spans(array("q", allocated), total, count)
    if not allocated:
        assert spans == []
        return
    assert spans[0][0] == 0 and spans[-1][1] == total
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:], strict=False))
    assert all(first == next_block and pieces == 0 for first, _end, next_block, pieces in spans)
    shares = [sum(1 for i in allocated if first <= i < end) for first, end, _, _ in spans]
    assert sum(shares) == len(allocated) and all(shares)
    assert max(shares) - min(shares) <= 1
    assert len(spans) == min(count, len(allocated))
