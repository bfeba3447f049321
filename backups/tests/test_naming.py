"""Names cannot move a key out of the tenant's prefix or widen a session policy."""

import json
import re
import uuid

import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from backups import naming
from backups.models import Backup
from backups.services import backup_start
from backups.services.downloads import read_policy
from reclo_site.cloud import credentials
from reclo_site.errors import ServiceError

ARN_PREFIX = "arn:aws:s3:::reclo-test/"

# Text that goes for the dangerous characters: separators, dots, wildcards,
# policy variables, whitespace, NUL and non-ASCII look-alikes.
_odd = st.text(
    alphabet=st.sampled_from(list("aZ09._-/\\*?${}[]:. \t\n\x00%~ä∕／․")) | st.characters(), min_size=0, max_size=80
)
_valid = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}", fullmatch=True)
# Half valid names (so keys and policies do get built), half crafted ones,
# and valid names with something dangerous spliced in.
crafted = st.one_of(_valid, _odd, st.builds(lambda a, b, c: a + b + c, _valid, _odd, _valid))


def iam_matches(pattern: str, value: str) -> bool:
    """How IAM matches a resource: `*` any run of characters (slashes too), `?` any one."""
    assert "${" not in pattern, "policy variables must never reach a policy"
    regex = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    return re.fullmatch(regex, value, flags=re.S) is not None


def test_it_accepts_ordinary_server_and_disk_names():
    for name in ["fileserver", "FILESERVER-01", "db.clinic.local", "sda", "nvme0n1", "PhysicalDrive0", "C", "a" * 63]:
        assert naming.check_name(name) == name


@pytest.mark.parametrize(
    "name",
    ["", "..", "a..b", "../etc", "a/b", "/a", "a\\b", "*", "a*", "a?", "${aws:username}", "$x", " a", "a ", "a\n",
     "-a", ".a", "_a", "a" * 64, "ä", "a\x00", "a%2f", "a:b"],
)  # fmt: skip
def test_it_refuses_names_that_could_reach_outside_a_key(name):
    with pytest.raises(naming.InvalidName):
        naming.check_name(name)


def test_the_key_has_the_documented_shape():
    backup_id = uuid.uuid4()
    key = naming.backup_key(user_id=7, server="fileserver", disk="sda", backup_id=backup_id)
    assert key == f"backups/7/fileserver/sda/{backup_id}.vhd.zst"
    assert naming.backup_key(user_id=7, server="s", disk="d", backup_id=backup_id, merged=True).endswith(
        f"/{backup_id}.merged.vhd.zst"
    )


def test_only_portal_made_ids_make_keys():
    with pytest.raises(TypeError):
        naming.backup_key(user_id=7, server="s", disk="d", backup_id="../../x")
    with pytest.raises(ValueError):
        naming.backup_key(user_id=0, server="s", disk="d", backup_id=uuid.uuid4())


@given(server=crafted, disk=crafted, user_id=st.integers(min_value=1, max_value=10**9))
@hsettings(max_examples=400, deadline=None)
def test_no_name_widens_a_policy_or_escapes_the_prefix(server, disk, user_id):
    # (The bucket is conftest's "reclo-test".)
    backup_id = uuid.uuid4()
    try:
        key = naming.backup_key(user_id=user_id, server=server, disk=disk, backup_id=backup_id)
    except naming.InvalidName:
        return
    # The key: exactly five segments under the tenant's prefix, nothing special in it.
    parts = key.split("/")
    assert parts == ["backups", str(user_id), server, disk, f"{backup_id}.vhd.zst"]
    assert ".." not in parts and not set("*?$\\").intersection(key) and key.isascii()

    # The upload policy names exactly that key, and matches no other object.
    policy = json.loads(credentials.upload_policy(key))
    statement, *write_once = policy["Statement"]
    assert all(s["Effect"] == "Deny" and s["Resource"] == ARN_PREFIX + key for s in write_once)
    assert statement["Resource"] == ARN_PREFIX + key
    assert statement["Action"] == ["s3:PutObject", "s3:AbortMultipartUpload"]
    others = [
        f"backups/{user_id}/{server}/{disk}/{uuid.uuid4()}.vhd.zst",
        f"backups/{user_id + 1}/{server}/{disk}/{backup_id}.vhd.zst",
        f"backups/{user_id}/.reclo-tenant.json",
        key + "x",
        key.rsplit("/", 1)[0] + "/",
    ]
    assert iam_matches(statement["Resource"], ARN_PREFIX + key)
    assert not any(iam_matches(statement["Resource"], ARN_PREFIX + other) for other in others)

    # A download policy of a chain with that key (whole ARNs or id-anchored patterns).
    chain = [key] + [
        naming.backup_key(user_id=user_id, server=server, disk=disk, backup_id=uuid.uuid4()) for _ in range(14)
    ]
    resources = json.loads(read_policy(user_id, chain))["Statement"][0]["Resource"]
    for resource in resources:
        matched = [k for k in chain + others if iam_matches(resource, ARN_PREFIX + k)]
        assert len(matched) == 1


@pytest.mark.django_db
@given(server=crafted, disk=crafted, file_name=crafted)
@hsettings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_the_upload_service_grants_one_key_whatever_the_names(user, aws, server, disk, file_name):
    # Every example is one more pending upload of the same account.
    Backup.objects.filter(user=user).delete()
    try:
        grant = backup_start(user=user, server=server, disk=disk, file_name=file_name, virtual_size=4096, kind="full")
    except ServiceError as exc:
        assert exc.code == 104
        return
    key = grant.backup.key
    assert key == f"backups/{user.pk}/{server}/{disk}/{grant.backup.pk}.vhd.zst"
    assert json.loads(grant.credentials.policy)["Statement"][0]["Resource"] == ARN_PREFIX + key
