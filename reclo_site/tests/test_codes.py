"""The error codes of docs/api.md: one table in the portal, mirrored by the agent."""

from reclo_agent.codes import Code as AgentCode

from reclo_site.api.errors import ERROR_CODES
from reclo_site.errors import Code, ServiceError


def test_the_agent_knows_every_code_by_the_same_name_and_number():
    assert [(c.name, c.value) for c in AgentCode] == [(c.name, c.value) for c in Code]


def test_the_schema_table_is_the_enum():
    assert ERROR_CODES == {c.value: (c.http_status, c.text) for c in Code}
    assert ERROR_CODES[401] == (404, "no restorable backup with that id")


def test_a_service_error_for_one_field_carries_its_message_there():
    exc = ServiceError(Code.NO_RESTORABLE_BACKUP, "No backup of yours has that id.", field="backup_id")
    assert (exc.code, exc.code.http_status) == (401, 404)
    assert exc.fields == {"backup_id": ["No backup of yours has that id."]}
    assert ServiceError(Code.NO_UPLOAD).message == "No upload found."
