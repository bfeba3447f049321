"""STS credentials: the exact session policies, and how they are obtained (moto's STS)."""

import json
from datetime import UTC, datetime, timedelta

import pytest
from moto.core import DEFAULT_ACCOUNT_ID
from moto.sts.models import sts_backends

from backups.services.downloads import read_policy
from reclo_site.cloud import clients, credentials

KEY = "backups/7/fileserver/sda/0b7e3f7c-1111-4222-8333-944445555666.vhd.zst"
ROLE = "arn:aws:iam::123456789012:role/reclo-uploader"


def test_the_upload_policy_writes_one_key_and_nothing_else():
    assert json.loads(credentials.upload_policy(KEY)) == {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Sid": "WriteOneBackup",
                "Effect": "Allow",
                "Action": ["s3:PutObject", "s3:AbortMultipartUpload"],
                "Resource": f"arn:aws:s3:::reclo-test/{KEY}",
            },
            # Write-once: creating the object without If-None-Match: * is denied.
            {
                "Sid": "WriteItOnce",
                "Effect": "Deny",
                "Action": "s3:PutObject",
                "Resource": f"arn:aws:s3:::reclo-test/{KEY}",
                "Condition": {
                    "Null": {"s3:if-none-match": "true"},
                    "Bool": {"s3:ObjectCreationOperation": "true"},
                },
            },
            {
                "Sid": "OnlyIfAbsent",
                "Effect": "Deny",
                "Action": "s3:PutObject",
                "Resource": f"arn:aws:s3:::reclo-test/{KEY}",
                "Condition": {
                    "StringNotEquals": {"s3:if-none-match": "*"},
                    "Bool": {"s3:ObjectCreationOperation": "true"},
                },
            },
        ],
    }


def test_the_write_once_denials_spare_the_multipart_calls_that_cannot_carry_the_header():
    # CreateMultipartUpload and UploadPart authorize as s3:PutObject with
    # s3:ObjectCreationOperation false; without that clause every multipart
    # upload would be denied at its first part.
    denials = [s for s in json.loads(credentials.upload_policy(KEY))["Statement"] if s["Effect"] == "Deny"]
    assert denials and all(s["Condition"]["Bool"] == {"s3:ObjectCreationOperation": "true"} for s in denials)
    # And nothing is denied that an agent's own abort needs.
    assert all(s["Action"] == "s3:PutObject" for s in denials)


def test_no_read_list_or_delete_action_is_granted_for_uploads():
    actions = json.loads(credentials.upload_policy(KEY))["Statement"][0]["Action"]
    assert not [a for a in actions if a.startswith(("s3:List", "s3:Get", "s3:Delete")) or "*" in a]


def test_the_download_policy_reads_exactly_the_chain():
    keys = [KEY, KEY.replace("0b7e", "1b7e")]
    assert json.loads(read_policy(7, keys)) == {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Sid": "ReadOneChain",
                "Effect": "Allow",
                # GetObjectVersion: the agent reads the verified version by its id.
                "Action": ["s3:GetObject", "s3:GetObjectVersion"],
                "Resource": [f"arn:aws:s3:::reclo-test/{k}" for k in keys],
            }
        ],
    }


def test_a_chain_too_long_for_whole_arns_gets_id_anchored_patterns():
    server, disk = "s" * 63, "d" * 63
    keys = [f"backups/7/{server}/{disk}/{n:08d}-1111-4222-8333-944445555666.vhd.zst" for n in range(14)]
    resources = json.loads(read_policy(7, keys))["Statement"][0]["Resource"]
    assert resources == [f"arn:aws:s3:::reclo-test/backups/7/*/{k.rsplit('/', 1)[1]}" for k in keys]


def test_a_chain_too_long_even_for_patterns_is_refused():
    keys = [f"backups/7/s/d/{n:08d}-1111-4222-8333-944445555666.vhd.zst" for n in range(40)]
    with pytest.raises(credentials.PolicyTooLarge):
        read_policy(7, keys)


@pytest.mark.parametrize("key", ["backups/7/*", "backups/7/a?b", "backups/${aws:username}/x", "/backups/7/x", ""])
def test_the_adapter_refuses_keys_with_iam_wildcards(key):
    with pytest.raises(ValueError):
        credentials.object_arn(key)


def test_other_partitions_get_their_arns(settings):
    settings.AWS_REGION = "cn-north-1"
    assert credentials.object_arn("backups/7/x").startswith("arn:aws-cn:s3:::")


def _capture_sts_calls(monkeypatch) -> list:
    """Record the parameters of each STS call the adapter makes (the calls still go to moto)."""
    calls = []

    def client(service, **kwargs):
        made = clients.client(service, **kwargs)
        made.meta.events.register(
            "provide-client-params.sts.*", lambda params, model, **kw: calls.append((model.name, dict(params)))
        )
        return made

    monkeypatch.setattr(credentials, "client", client)
    return calls


def test_by_default_it_asks_for_a_federation_token_with_the_policy(aws, monkeypatch):
    calls = _capture_sts_calls(monkeypatch)
    policy = credentials.upload_policy(KEY)
    creds = credentials.issue(policy=policy, session_name="reclo-up-7-0b7e3f7c11114222833394444555566600")
    ((operation, params),) = calls
    assert operation == "GetFederationToken"
    assert params["Policy"] == policy
    assert params["DurationSeconds"] == 12 * 3600
    assert len(params["Name"]) <= 32
    assert creds.policy == policy
    assert timedelta(hours=11) < creds.expiration - datetime.now(UTC) <= timedelta(hours=12, seconds=5)


def test_with_a_role_it_assumes_the_role_with_the_policy(aws, settings):
    settings.RECLO_UPLOAD_ROLE_ARN = ROLE
    policy = credentials.upload_policy(KEY)
    creds = credentials.issue(policy=policy, session_name="reclo-up-7-abc")
    session = sts_backends[DEFAULT_ACCOUNT_ID]["aws"].assumed_roles[-1]
    assert (session.role_arn, session.policy, session.session_name) == (ROLE, policy, "reclo-up-7-abc")
    assert creds.access_key_id == session.access_key_id
    assert timedelta(hours=11) < session.expiration.replace(tzinfo=UTC) - datetime.now(UTC) <= timedelta(hours=12)


@pytest.mark.parametrize(("hours", "seconds"), [(24, 12 * 3600), (1, 3600), (0.1, 900)])
def test_the_lifetime_is_kept_between_15_minutes_and_12_hours(aws, settings, monkeypatch, hours, seconds):
    settings.RECLO_CREDENTIALS_TTL = timedelta(hours=hours)
    calls = _capture_sts_calls(monkeypatch)
    credentials.issue(policy=credentials.upload_policy(KEY), session_name="x")
    assert calls[0][1]["DurationSeconds"] == seconds


def test_session_names_keep_only_what_sts_accepts(aws, monkeypatch):
    calls = _capture_sts_calls(monkeypatch)
    credentials.issue(policy=credentials.upload_policy(KEY), session_name="reclo up/ä*7")
    assert calls[0][1]["Name"] == "recloup7"


def test_the_api_form_of_credentials_uses_boto3_names_and_rfc3339():
    creds = credentials.TemporaryCredentials("AK", "SK", "ST", datetime(2026, 11, 26, 4, 12, 7, tzinfo=UTC), "{}")
    assert creds.as_api() == {
        "AccessKeyId": "AK",
        "SecretAccessKey": "SK",
        "SessionToken": "ST",
        "Expiration": "2026-11-26T04:12:07Z",
    }
