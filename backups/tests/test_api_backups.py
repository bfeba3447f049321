"""List, detail, delete and download grants; tenants, tokens and malformed requests on every endpoint."""

import json
import uuid
from datetime import timedelta

import pytest
from django.db import OperationalError, connection
from django.utils import timezone
from moto.core import DEFAULT_ACCOUNT_ID
from moto.sts.models import sts_backends

from backups.models import Backup
from reclo_site import cloud
from reclo_site.cloud import credentials, storage

from .factories import BackupFactory, ServerFactory
from .test_api_uploads import failing_client

pytestmark = pytest.mark.django_db

LIST = "/api/v1/backups"


def failing_on(table: str):
    """A database that fails every query touching `table` (connection.execute_wrapper)."""

    def wrapper(execute, sql, params, many, context):
        if table in sql:
            raise OperationalError("server closed the connection unexpectedly")
        return execute(sql, params, many, context)

    return wrapper


@pytest.fixture
def server(user):
    return ServerFactory(user=user, name="fileserver")


def make_backups(server, count, *, disk="sda", start=None):
    start = start or timezone.now() - timedelta(days=1)
    return [BackupFactory(server=server, disk=disk, date_created=start + timedelta(minutes=n)) for n in range(count)]


class TestList:
    def test_it_lists_the_users_backups_newest_first(self, api, server, other_user):
        backups = make_backups(server, 3)
        make_backups(ServerFactory(user=other_user, name="fileserver"), 2)
        body = api.get(LIST).json()
        assert body["count"] == 3 and body["next"] is None
        assert [b["backup_id"] for b in body["backups"]] == [str(b.pk) for b in reversed(backups)]

    def test_each_backup_has_the_contracts_fields(self, api, server):
        backup = BackupFactory(server=server, file_size=3 * 1024 * 1024)
        (item,) = api.get(LIST).json()["backups"]
        assert item == {
            "backup_id": str(backup.pk),
            "server": "fileserver",
            "disk": "sda",
            "kind": "full",
            "parent_id": None,
            "file_name": backup.file_name,
            "file_size": 3 * 1024 * 1024,
            "file_size_mb": 3.0,
            "virtual_size": backup.virtual_size,
            "sha256": backup.sha256,
            "status": "verified",
            "failure": None,
            "date_created": backup.date_created.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "completed_at": None,
            "verified_at": backup.verified_at.strftime("%Y-%m-%dT%H:%M:%SZ"),
        }

    def test_an_empty_account_gets_an_empty_list(self, api):
        assert api.get(LIST).json() == {
            "message": "0 backup(s).",
            "count": 0,
            "next": None,
            "previous": None,
            "backups": [],
        }

    def test_it_pages_with_count_and_next(self, api, server):
        backups = list(reversed(make_backups(server, 5)))
        first = api.get(LIST, {"page_size": 2}).json()
        assert first["count"] == 5 and first["previous"] is None
        assert first["next"] == "http://testserver/api/v1/backups?page_size=2&page=2"
        second = api.get(first["next"]).json()
        third = api.get(second["next"]).json()
        assert third["next"] is None
        ids = [b["backup_id"] for page in (first, second, third) for b in page["backups"]]
        assert ids == [str(b.pk) for b in backups]

    def test_it_filters_by_server(self, api, server, user):
        make_backups(server, 2)
        other = make_backups(ServerFactory(user=user, name="mailserver"), 1)
        body = api.get(LIST, {"server": "mailserver"}).json()
        assert [b["backup_id"] for b in body["backups"]] == [str(other[0].pk)]
        assert api.get(LIST, {"server": "nosuchserver"}).json()["count"] == 0

    @pytest.mark.parametrize("query", [{"page": "0"}, {"page": "x"}, {"page_size": "500"}, {"server": "../x"}])
    def test_bad_query_parameters_are_104(self, api, query):
        response = api.get(LIST, query)
        assert (response.status_code, response.json()["error"]) == (400, 104)

    def test_the_number_of_queries_does_not_grow_with_the_backups(self, api, server):
        def queries_for_a_page():
            from django.db import connection
            from django.test.utils import CaptureQueriesContext

            with CaptureQueriesContext(connection) as ctx:
                assert api.get(LIST).status_code == 200
            return len(ctx)

        make_backups(server, 60)
        api.get(LIST)  # the token's once-a-minute "last used" write happens here
        few = queries_for_a_page()
        make_backups(server, 600, disk="sdb")
        assert queries_for_a_page() == few

    def test_a_short_page_counts_without_a_count_query(self, api, server):
        from django.test.utils import CaptureQueriesContext

        make_backups(server, 3)
        api.get(LIST)  # the token's "last used" write
        with CaptureQueriesContext(connection) as ctx:
            body = api.get(LIST).json()
        assert body["count"] == 3 and body["next"] is None
        assert not [q for q in ctx.captured_queries if "COUNT(" in q["sql"].upper()]
        last = api.get(LIST, {"page_size": 2, "page": 2}).json()
        assert (last["count"], len(last["backups"]), last["next"]) == (3, 1, None)
        beyond = api.get(LIST, {"page_size": 2, "page": 5}).json()
        assert (beyond["count"], beyond["backups"]) == (3, [])
        assert api.get(LIST, {"page_size": 3}).json()["count"] == 3  # a full page: counted

    def test_the_hand_built_output_equals_drfs_generic_one(self, server):
        from rest_framework import serializers

        from backups.api import BackupOutput

        full = BackupFactory(server=server, file_size=3 * 1024 * 1024 + 7)
        rows = [
            full,
            BackupFactory(server=server, kind=Backup.Kind.INCREMENTAL, parent=full, completed_at=timezone.now()),
            BackupFactory(server=server, status=Backup.Status.FAILED, failure="sha256 mismatch", verified_at=None),
            BackupFactory(server=server, status=Backup.Status.PENDING, file_size=None, sha256="", verified_at=None),
        ]
        for backup in Backup.objects.filter(pk__in=[b.pk for b in rows]).select_related("server"):
            generic = serializers.Serializer.to_representation(BackupOutput(), backup)
            assert BackupOutput(backup).data == dict(generic)

    def test_a_database_failure_is_301(self, api, server):
        make_backups(server, 1)
        with connection.execute_wrapper(failing_on("backups_backup")):
            response = api.get(LIST)
        assert (response.status_code, response.json()["error"]) == (503, 301)


class TestDetail:
    def test_it_shows_one_backup(self, api, server):
        backup = BackupFactory(server=server, status="failed", failure="Not a valid restore point: x")
        body = api.get(f"{LIST}/{backup.pk}").json()
        assert body["backup"]["backup_id"] == str(backup.pk)
        assert body["backup"]["failure"] == "Not a valid restore point: x"

    def test_an_unknown_id_is_404(self, api):
        response = api.get(f"{LIST}/{uuid.uuid4()}")
        assert (response.status_code, response.json()["error"]) == (404, 105)

    def test_a_malformed_id_is_404(self, api):
        assert api.get(f"{LIST}/not-a-uuid").status_code == 404


class TestDelete:
    @pytest.fixture
    def chain(self, server, aws):
        full = BackupFactory(server=server, date_created=timezone.now() - timedelta(hours=3))
        inc1 = BackupFactory(
            server=server, kind="incremental", parent=full, date_created=full.date_created + timedelta(hours=1)
        )
        inc2 = BackupFactory(
            server=server, kind="incremental", parent=inc1, date_created=inc1.date_created + timedelta(hours=1)
        )
        for backup in (full, inc1, inc2):
            storage.put_object(backup.key, b"vhd")
        return full, inc1, inc2

    def test_it_deletes_the_newest_restore_point_and_its_object(self, api, chain):
        *_, inc2 = chain
        response = api.delete(f"{LIST}/{inc2.pk}")
        assert response.status_code == 200
        assert response.json()["deleted"] == [str(inc2.pk)]
        assert not Backup.objects.filter(pk=inc2.pk).exists()
        with pytest.raises(cloud.ObjectNotFound):
            storage.head_object(inc2.key)

    def test_a_backup_with_dependents_is_311(self, api, chain):
        full, *_ = chain
        response = api.delete(f"{LIST}/{full.pk}")
        assert (response.status_code, response.json()["error"]) == (409, 311)
        assert Backup.objects.filter(status="verified").count() == 3

    def test_cascade_deletes_the_dependents_newest_first(self, api, chain):
        full, inc1, inc2 = chain
        response = api.delete(f"{LIST}/{full.pk}?cascade=true")
        assert response.json()["deleted"] == [str(inc2.pk), str(inc1.pk), str(full.pk)]
        assert not Backup.objects.exists()
        for backup in chain:
            with pytest.raises(cloud.ObjectNotFound):
                storage.head_object(backup.key)

    def test_failed_dependents_do_not_block_and_go_along(self, api, server, aws):
        full = BackupFactory(server=server)
        BackupFactory(server=server, kind="incremental", parent=full, status="failed")
        assert api.delete(f"{LIST}/{full.pk}").status_code == 200
        assert not Backup.objects.exists()

    def test_a_database_failure_finding_what_to_delete_is_308(self, api, chain):
        with connection.execute_wrapper(failing_on("backups_backup")):
            response = api.delete(f"{LIST}/{chain[2].pk}")
        assert (response.status_code, response.json()["error"]) == (500, 308)
        assert Backup.objects.count() == 3 and storage.head_object(chain[2].key)

    def test_an_unknown_id_is_309(self, api, aws):
        response = api.delete(f"{LIST}/{uuid.uuid4()}")
        assert (response.status_code, response.json()["error"]) == (404, 309)

    def test_a_storage_failure_is_310_and_deleting_again_finishes(self, api, chain, monkeypatch):
        *_, inc2 = chain
        failing_client(monkeypatch, storage, "s3", "delete_object", "InternalError", 500)
        response = api.delete(f"{LIST}/{inc2.pk}")
        assert (response.status_code, response.json()["error"]) == (502, 310)
        assert Backup.objects.get(pk=inc2.pk).status == "failed"  # no incremental can build on it now
        monkeypatch.undo()
        assert api.delete(f"{LIST}/{inc2.pk}").status_code == 200

    def test_a_bad_cascade_value_is_104(self, api, chain):
        assert api.delete(f"{LIST}/{chain[2].pk}?cascade=maybe").json()["error"] == 104

    def test_a_pending_uploads_key_is_purged_after_its_credentials_expire(self, api, server, aws):
        pending = BackupFactory(server=server, status="pending", credentials_expire=timezone.now() + timedelta(hours=5))
        api.delete(f"{LIST}/{pending.pk}")
        from backups.models import ObjectDeletion

        assert ObjectDeletion.objects.get(key=pending.key).not_before == pending.credentials_expire


class TestDownload:
    @pytest.fixture
    def chain(self, disk):
        full = disk.full()
        return full, disk.incremental(2), disk.incremental(3)

    def test_it_grants_read_only_credentials_for_exactly_the_chain(self, api, chain, settings):
        settings.RECLO_UPLOAD_ROLE_ARN = "arn:aws:iam::123456789012:role/reclo-uploader"  # moto records the policy
        response = api.post(f"{LIST}/{chain[1].pk}/download")
        assert response.status_code == 200
        body = response.json()
        assert [e["backup_id"] for e in body["chain"]] == [str(chain[0].pk), str(chain[1].pk)]
        assert body["chain"][0] == {
            "backup_id": str(chain[0].pk),
            "kind": "full",
            "key": chain[0].key,
            "file_size": chain[0].file_size,
            "sha256": chain[0].sha256,
            "version_id": chain[0].version_id,
            "etag": chain[0].etag,
        }
        assert (body["bucket"], body["region"], body["endpoint_url"]) == ("reclo-test", "us-east-1", None)
        policy = json.loads(sts_backends[DEFAULT_ACCOUNT_ID]["aws"].assumed_roles[-1].policy)
        assert policy["Statement"] == [
            {
                "Sid": "ReadOneChain",
                "Effect": "Allow",
                "Action": ["s3:GetObject", "s3:GetObjectVersion"],
                "Resource": [f"arn:aws:s3:::reclo-test/{chain[0].key}", f"arn:aws:s3:::reclo-test/{chain[1].key}"],
            }
        ]
        assert (
            body["credentials"]["AccessKeyId"]
            == sts_backends[DEFAULT_ACCOUNT_ID]["aws"].assumed_roles[-1].access_key_id
        )

    def test_a_restore_point_not_verified_yet_is_401(self, api, chain):
        Backup.objects.filter(pk=chain[1].pk).update(status="verifying")
        response = api.post(f"{LIST}/{chain[2].pk}/download")
        assert (response.status_code, response.json()["error"]) == (404, 401)

    def test_a_chain_with_a_failed_restore_point_is_307(self, api, chain):
        Backup.objects.filter(pk=chain[0].pk).update(status="failed", failure="Scrub: The object is not in storage.")
        response = api.post(f"{LIST}/{chain[2].pk}/download")
        assert (response.status_code, response.json()["error"]) == (422, 307)
        assert "not in storage" in response.json()["message"]

    def test_an_unknown_id_is_401(self, api, aws):
        assert api.post(f"{LIST}/{uuid.uuid4()}/download").json()["error"] == 401

    def test_an_sts_failure_is_303(self, api, chain, monkeypatch):
        failing_client(monkeypatch, credentials, "sts", "get_federation_token")
        assert api.post(f"{LIST}/{chain[0].pk}/download").json()["error"] == 303


class TestTenantsAndTokens:
    """Another tenant's ids answer 404 on every endpoint and change nothing; bad tokens answer 102."""

    @pytest.fixture
    def theirs(self, other_user, aws):
        backup = BackupFactory(server=ServerFactory(user=other_user, name="fileserver"))
        pending = BackupFactory(server=backup.server, status="pending", kind="incremental", parent=backup,
                                credentials_expire=timezone.now() + timedelta(hours=1))  # fmt: skip
        storage.put_object(backup.key, b"theirs")
        storage.put_object(pending.key, b"theirs")
        return backup, pending

    def test_every_endpoint_answers_404_for_another_tenants_ids(self, api, theirs):
        backup, pending = theirs
        before = list(Backup.objects.order_by("pk").values())
        complete = {"file_size": 6, "sha256": "a" * 64}
        calls = [
            (api.get(f"{LIST}/{backup.pk}"), 105),
            (api.delete(f"{LIST}/{backup.pk}?cascade=true"), 309),
            (api.post(f"{LIST}/{backup.pk}/download"), 401),
            (api.post(f"/api/v1/backups/uploads/{pending.pk}/credentials"), 305),
            (api.post(f"/api/v1/backups/uploads/{pending.pk}/complete", complete, format="json"), 305),
        ]
        for response, code in calls:
            assert (response.status_code, response.json()["error"]) == (404, code)
        assert api.get(LIST).json()["count"] == 0
        assert api.get(LIST, {"server": "fileserver"}).json()["count"] == 0
        assert list(Backup.objects.order_by("pk").values()) == before
        assert storage.head_object(backup.key)["size"] == 6

    @pytest.mark.parametrize("header", [None, "Token short", "Token " + "x" * 32, "Bearer " + "a" * 32, "Token"])
    def test_every_endpoint_refuses_a_bad_token_with_102(self, anon_api, header, aws):
        if header:
            anon_api.credentials(HTTP_AUTHORIZATION=header)
        some = uuid.uuid4()
        responses = [
            anon_api.get(LIST),
            anon_api.get(f"{LIST}/{some}"),
            anon_api.delete(f"{LIST}/{some}"),
            anon_api.post(f"{LIST}/{some}/download"),
            anon_api.post("/api/v1/backups/uploads", {}, format="json"),
            anon_api.post(f"/api/v1/backups/uploads/{some}/credentials"),
            anon_api.post(f"/api/v1/backups/uploads/{some}/complete", {}, format="json"),
        ]
        for response in responses:
            assert (response.status_code, response.json()["error"]) == (401, 102)

    def test_a_revoked_token_is_102(self, api, token, user):
        from accounts.models import ApiToken

        ApiToken.objects.filter(user=user).update(revoked_at=timezone.now())
        assert api.get(LIST).json()["error"] == 102

    def test_a_token_in_the_url_is_refused(self, api, token):
        assert api.get(LIST, {"token": token}).json()["error"] == 102


def test_the_schema_describes_every_backup_operation(api):
    schema = api.get("/api/v1/schema").json()
    paths = schema["paths"]
    assert {"get"} <= set(paths["/api/v1/backups"])
    assert {"get", "delete"} <= set(paths["/api/v1/backups/{backup_id}"])
    for path in ["/api/v1/backups/uploads", "/api/v1/backups/uploads/{upload_id}/credentials",
                 "/api/v1/backups/uploads/{upload_id}/complete", "/api/v1/backups/{backup_id}/download"]:  # fmt: skip
        assert "post" in paths[path]
    complete = paths["/api/v1/backups/uploads/{upload_id}/complete"]["post"]["responses"]
    assert {"202", "404", "409", "422", "413", "502"} <= set(complete)
    assert "306" in complete["409"]["description"]
