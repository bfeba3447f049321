"""The upload API: start (credentials), credentials refresh, complete."""

import hashlib
import uuid
from datetime import timedelta

import boto3
import pytest
from botocore.stub import Stubber
from django.utils import timezone

from backups.models import AccountLimits, Backup, Server
from reclo_site import cloud
from reclo_site.cloud import clients, credentials, storage

from .conftest import START
from .factories import BackupFactory, ServerFactory

pytestmark = pytest.mark.django_db

UPLOADS = "/api/v1/backups/uploads"
DATA = b"stored object bytes"


def start(api, **overrides):
    return api.post(UPLOADS, {**START, "kind": "full", **overrides}, format="json")


def failing_client(monkeypatch, module, service: str, operation: str, code="InternalError", status=500):
    """Make the adapter's next `operation` call fail the way AWS would (botocore's Stubber)."""

    def client(name, **kwargs):
        made = clients.new_client(name, **kwargs) if name == service else clients.client(name, **kwargs)
        if name == service:
            stubber = Stubber(made)
            stubber.add_client_error(operation, service_error_code=code, http_status_code=status)
            stubber.activate()
        return made

    monkeypatch.setattr(module, "client", client)


class TestStart:
    def test_it_grants_credentials_for_one_new_key(self, api, user, aws):
        response = start(api)
        assert response.status_code == 201
        body = response.json()
        backup = Backup.objects.get()
        assert body["upload_id"] == body["backup_id"] == str(backup.pk)
        assert body["key"] == f"backups/{user.pk}/fileserver/sda/{backup.pk}.vhd.zst" == backup.key
        assert (body["bucket"], body["region"], body["endpoint_url"]) == ("reclo-test", "us-east-1", None)
        assert set(body["credentials"]) == {"AccessKeyId", "SecretAccessKey", "SessionToken", "Expiration"}
        assert body["credentials"]["Expiration"].endswith("Z")
        assert (backup.status, backup.kind, backup.user, backup.server.name) == ("pending", "full", user, "fileserver")
        # Upload credentials live one hour (RECLO_UPLOAD_CREDENTIALS_TTL), not the 12 of a restore.
        lifetime = backup.credentials_expire - timezone.now()
        assert timedelta(minutes=55) < lifetime < timedelta(hours=1, minutes=1)

    def test_the_endpoint_is_the_local_emulator_when_there_is_one(self, api, moto_server):
        response = start(api)
        assert response.status_code == 201
        assert response.json()["endpoint_url"] == moto_server
        refreshed = api.post(f"{UPLOADS}/{response.json()['upload_id']}/credentials")
        assert refreshed.json()["endpoint_url"] == moto_server

    def test_the_credentials_write_the_object_with_a_multipart_upload(self, api, aws):
        body = start(api).json()
        creds = body["credentials"]
        s3 = boto3.client(
            "s3",
            region_name=body["region"],
            aws_access_key_id=creds["AccessKeyId"],
            aws_secret_access_key=creds["SecretAccessKey"],
            aws_session_token=creds["SessionToken"],
        )
        part = b"x" * (5 * 1024 * 1024)
        upload = s3.create_multipart_upload(Bucket=body["bucket"], Key=body["key"])
        etags = []
        for number, chunk in enumerate([part, b"tail"], start=1):
            etags.append(
                s3.upload_part(
                    Bucket=body["bucket"], Key=body["key"], UploadId=upload["UploadId"], PartNumber=number, Body=chunk
                )["ETag"]
            )
        s3.complete_multipart_upload(
            Bucket=body["bucket"],
            Key=body["key"],
            UploadId=upload["UploadId"],
            MultipartUpload={"Parts": [{"PartNumber": n, "ETag": e} for n, e in enumerate(etags, start=1)]},
        )
        assert storage.head_object(body["key"])["size"] == len(part) + 4

    def test_a_known_server_is_reused(self, api, user, aws):
        server = ServerFactory(user=user, name="fileserver")
        start(api)
        assert Server.objects.get() == server

    def test_sizes_and_digest_may_be_declared_at_start(self, api, aws):
        response = start(api, file_size=123, sha256="AB" * 32)
        backup = Backup.objects.get(pk=response.json()["upload_id"])
        assert (backup.file_size, backup.sha256) == (123, "ab" * 32)

    @pytest.mark.parametrize(
        ("field", "value"),
        [
            ("server", "../other"),
            ("server", "a/b"),
            ("server", "*"),
            ("disk", "${aws:username}"),
            ("disk", ""),
            ("file_name", "x/../../y"),
            ("virtual_size", 1000),
            ("virtual_size", 0),
            ("virtual_size", 4 * 1024**4),
            ("kind", "differential"),
            ("sha256", "z" * 64),
            ("file_size", 0),
        ],
    )
    def test_invalid_fields_are_104_with_the_field_named(self, api, aws, field, value):
        response = start(api, **{field: value})
        assert response.status_code == 400
        assert response.json()["error"] == 104
        assert field in response.json()["fields"]
        assert not Backup.objects.exists() and not Server.objects.exists()

    @pytest.mark.parametrize(
        "body",
        [
            {**START, "kind": "full", "virtual_size": "3145728"},
            {**START, "kind": "full", "server": 5},
            {**START, "kind": "full", "file_size": True},
            {**START, "kind": "incremental", "parent_id": 12},
            {**START, "kind": "full", "virtual_size": 1.5},
            {"server": "fileserver"},
            [START],
        ],
    )
    def test_wrong_json_types_are_104(self, api, aws, body):
        response = api.post(UPLOADS, body, format="json")
        assert (response.status_code, response.json()["error"]) == (400, 104)

    def test_a_body_that_is_not_json_is_104(self, api, aws):
        response = api.post(UPLOADS, "{not json", content_type="application/json")
        assert (response.status_code, response.json()["error"]) == (400, 104)

    def test_a_declared_size_over_the_limit_is_313(self, api, aws, settings):
        settings.RECLO_MAX_BACKUP_SIZE = 1000
        response = start(api, file_size=1001)
        assert (response.status_code, response.json()["error"]) == (413, 313)
        assert not Backup.objects.exists()
        assert start(api, file_size=1000).status_code == 201

    def test_an_account_may_have_its_own_limit(self, api, user, aws, settings):
        settings.RECLO_MAX_BACKUP_SIZE = 1000
        AccountLimits.objects.create(user=user, max_file_size=5000)
        assert start(api, file_size=4000).status_code == 201
        assert start(api, file_size=5001).json()["error"] == 313

    def test_past_the_pending_upload_limit_it_is_429_code_103_with_retry_after(self, api, other_api, aws, settings):
        settings.RECLO_MAX_PENDING_UPLOADS = 2
        assert start(api).status_code == start(api).status_code == 201
        refused = start(api)
        assert (refused.status_code, refused.json()["error"]) == (429, 103)
        assert "2 uploads in progress" in refused.json()["message"]
        assert refused["Retry-After"] == "60"
        assert Backup.objects.count() == 2
        # Another tenant is not held up by this one's uploads.
        assert start(other_api).status_code == 201

    def test_completed_and_expired_uploads_free_their_slot(self, api, user, aws, settings):
        settings.RECLO_MAX_PENDING_UPLOADS = 2
        server = ServerFactory(user=user)
        BackupFactory(server=server, status="verifying")
        BackupFactory(server=server, status="pending", credentials_expire=timezone.now() - timedelta(minutes=1))
        BackupFactory(server=server, status="pending", credentials_expire=timezone.now() + timedelta(hours=1))
        assert start(api).status_code == 201
        assert start(api).status_code == 429

    def test_an_sts_failure_is_303_and_leaves_nothing_behind(self, api, aws, monkeypatch):
        failing_client(monkeypatch, credentials, "sts", "get_federation_token", "AccessDenied", 403)
        response = start(api)
        assert (response.status_code, response.json()["error"]) == (502, 303)
        assert not Backup.objects.exists() and not Server.objects.exists()


class TestChainRules:
    @pytest.fixture
    def parent(self, user):
        server = ServerFactory(user=user, name="fileserver")
        return BackupFactory(server=server, date_created=timezone.now() - timedelta(hours=1))

    def incremental(self, api, parent_id, **overrides):
        return start(api, kind="incremental", parent_id=str(parent_id), **overrides)

    def test_an_incremental_on_the_newest_verified_restore_point_is_granted(self, api, aws, parent):
        response = self.incremental(api, parent.pk)
        assert response.status_code == 201
        assert Backup.objects.get(pk=response.json()["upload_id"]).parent == parent

    def refused(self, response):
        assert (response.status_code, response.json()["error"]) == (409, 312), response.json()
        return response.json()["message"]

    def test_an_incremental_needs_a_parent(self, api, aws):
        assert "needs parent_id" in self.refused(start(api, kind="incremental"))

    def test_a_full_has_no_parent(self, api, aws, parent):
        self.refused(start(api, kind="full", parent_id=str(parent.pk)))

    def test_an_unknown_parent_is_refused(self, api, aws):
        assert "does not exist" in self.refused(self.incremental(api, uuid.uuid4()))

    def test_another_tenants_parent_is_refused_like_an_unknown_one(self, api, aws, other_user):
        theirs = BackupFactory(server=ServerFactory(user=other_user, name="fileserver"))
        assert "does not exist" in self.refused(self.incremental(api, theirs.pk))

    @pytest.mark.parametrize("status", ["pending", "verifying", "failed"])
    def test_a_parent_not_verified_is_refused(self, api, aws, parent, status):
        Backup.objects.filter(pk=parent.pk).update(status=status)
        assert "not verified" in self.refused(self.incremental(api, parent.pk))

    def test_a_parent_of_another_server_or_disk_is_refused(self, api, aws, parent):
        self.refused(self.incremental(api, parent.pk, server="otherserver"))
        self.refused(self.incremental(api, parent.pk, disk="sdb"))

    def test_a_parent_of_another_disk_size_is_refused(self, api, aws, parent):
        assert "full backup" in self.refused(self.incremental(api, parent.pk, virtual_size=parent.virtual_size * 2))

    def test_a_parent_that_is_not_the_newest_restore_point_is_refused(self, api, aws, parent):
        BackupFactory(server=parent.server)
        assert "not the newest" in self.refused(self.incremental(api, parent.pk))

    def test_nothing_is_left_behind_by_a_refusal(self, api, aws, parent):
        self.incremental(api, parent.pk, disk="sdb")
        assert Backup.objects.count() == 1


class TestCredentials:
    def test_it_hands_out_fresh_credentials_for_the_same_key(self, api, aws):
        first = start(api).json()
        response = api.post(f"{UPLOADS}/{first['upload_id']}/credentials")
        assert response.status_code == 200
        assert response.json()["key"] == first["key"]
        assert response.json()["upload_id"] == first["upload_id"]

    def test_a_completed_upload_gets_no_credentials(self, api, aws):
        upload_id = start(api).json()["upload_id"]
        Backup.objects.filter(pk=upload_id).update(status="verifying")
        response = api.post(f"{UPLOADS}/{upload_id}/credentials")
        assert (response.status_code, response.json()["error"]) == (404, 305)

    def test_an_expired_upload_gets_no_credentials(self, api, aws):
        upload_id = start(api).json()["upload_id"]
        Backup.objects.filter(pk=upload_id).update(credentials_expire=timezone.now() - timedelta(hours=2))
        assert api.post(f"{UPLOADS}/{upload_id}/credentials").json()["error"] == 305

    def test_an_unknown_upload_is_305(self, api, aws):
        assert api.post(f"{UPLOADS}/{uuid.uuid4()}/credentials").json()["error"] == 305

    def test_an_sts_failure_is_303(self, api, aws, monkeypatch):
        upload_id = start(api).json()["upload_id"]
        failing_client(monkeypatch, credentials, "sts", "get_federation_token")
        assert api.post(f"{UPLOADS}/{upload_id}/credentials").json()["error"] == 303


class TestComplete:
    @pytest.fixture
    def started(self, api, aws):
        return start(api).json()

    def complete(self, api, started, data=DATA, **body):
        body = {"file_size": len(data), "sha256": hashlib.sha256(data).hexdigest(), **body}
        return api.post(f"{UPLOADS}/{started['upload_id']}/complete", body, format="json")

    def test_it_checks_the_object_and_enqueues_the_verification(self, api, started, django_capture_on_commit_callbacks):
        storage.put_object(started["key"], DATA)
        with django_capture_on_commit_callbacks() as callbacks:
            response = self.complete(api, started)
        assert response.status_code == 202
        backup = response.json()["backup"]
        assert (backup["status"], backup["file_size"], backup["sha256"]) == (
            "verifying",
            len(DATA),
            hashlib.sha256(DATA).hexdigest(),
        )
        assert backup["file_size_mb"] == round(len(DATA) / 1024 / 1024, 3)
        assert len(callbacks) == 1  # the verification, sent only after the commit

    def test_a_missing_object_is_306_and_the_upload_stays_open(self, api, started):
        response = self.complete(api, started)
        assert (response.status_code, response.json()["error"]) == (409, 306)
        assert Backup.objects.get().status == "pending"
        storage.put_object(started["key"], DATA)
        assert self.complete(api, started).status_code == 202

    def test_a_wrong_size_is_307_the_backup_fails_and_the_object_goes(self, api, started):
        storage.put_object(started["key"], DATA)
        response = self.complete(api, started, file_size=len(DATA) + 1)
        assert (response.status_code, response.json()["error"]) == (422, 307)
        backup = Backup.objects.get()
        assert backup.status == "failed" and "bytes" in backup.failure
        with pytest.raises(cloud.ObjectNotFound):
            storage.head_object(started["key"])

    def test_declarations_that_disagree_are_307(self, api, aws):
        started = start(api, file_size=len(DATA)).json()
        storage.put_object(started["key"], DATA)
        response = self.complete(api, started, file_size=len(DATA) + 5)
        assert (response.status_code, response.json()["error"]) == (422, 307)
        assert Backup.objects.get().status == "pending"

    def test_what_was_declared_at_start_need_not_be_sent_again(self, api, aws, django_capture_on_commit_callbacks):
        started = start(api, file_size=len(DATA), sha256=hashlib.sha256(DATA).hexdigest()).json()
        storage.put_object(started["key"], DATA)
        response = api.post(f"{UPLOADS}/{started['upload_id']}/complete")
        assert (response.status_code, response.json()["backup"]["status"]) == (202, "verifying")

    def test_size_and_digest_are_required_when_not_declared(self, api, started):
        storage.put_object(started["key"], DATA)
        response = api.post(f"{UPLOADS}/{started['upload_id']}/complete", {}, format="json")
        assert (response.status_code, response.json()["error"]) == (400, 104)
        assert "file_size" in response.json()["fields"]

    @pytest.mark.parametrize("body", [{"file_size": "19"}, {"sha256": 5}, {"file_size": -1}, {"sha256": "x" * 64}])
    def test_malformed_bodies_are_104(self, api, started, body):
        storage.put_object(started["key"], DATA)
        response = api.post(f"{UPLOADS}/{started['upload_id']}/complete", body, format="json")
        assert (response.status_code, response.json()["error"]) == (400, 104)

    def test_a_size_over_the_limit_is_313(self, api, started, settings):
        settings.RECLO_MAX_BACKUP_SIZE = 10
        storage.put_object(started["key"], DATA)
        assert self.complete(api, started).json()["error"] == 313

    def test_a_storage_failure_is_304(self, api, started, monkeypatch):
        storage.put_object(started["key"], DATA)
        failing_client(monkeypatch, storage, "s3", "head_object", "InternalError", 500)
        response = self.complete(api, started)
        assert (response.status_code, response.json()["error"]) == (502, 304)
        assert Backup.objects.get().status == "pending"

    def test_a_second_complete_returns_the_same_backup(self, api, started, django_capture_on_commit_callbacks):
        storage.put_object(started["key"], DATA)
        first = self.complete(api, started).json()["backup"]
        with django_capture_on_commit_callbacks() as callbacks:
            second = self.complete(api, started, file_size=1)
        assert second.status_code == 202 and second.json()["backup"] == first
        assert callbacks == []  # not verified twice

    def test_an_expired_upload_cannot_complete(self, api, started):
        storage.put_object(started["key"], DATA)
        Backup.objects.filter(pk=started["upload_id"]).update(credentials_expire=timezone.now() - timedelta(hours=2))
        assert self.complete(api, started).json()["error"] == 305

    def test_an_unknown_upload_is_305(self, api, aws):
        response = api.post(f"{UPLOADS}/{uuid.uuid4()}/complete", {"file_size": 1, "sha256": "a" * 64}, format="json")
        assert (response.status_code, response.json()["error"]) == (404, 305)
