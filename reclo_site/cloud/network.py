"""EC2 networking: a tenant's recovery VPC, subnet, internet gateway and security groups.

None of the create calls here takes a ClientToken, so callers make them
idempotent the other way: every resource is created with tags, and the
caller looks for a tagged one (`find_tagged`) before creating, and saves the
id as soon as it has it. The follow-up calls (attach, route, ingress rule)
are idempotent themselves: "already done" answers count as success.
"""

from botocore.exceptions import BotoCoreError, ClientError

from .clients import client
from .errors import CloudError, ObjectNotFound, translate

# How each kind of resource is described: (operation, list key, id key).
_DESCRIBE = {
    "vpc": ("describe_vpcs", "Vpcs", "VpcId"),
    "subnet": ("describe_subnets", "Subnets", "SubnetId"),
    "internet-gateway": ("describe_internet_gateways", "InternetGateways", "InternetGatewayId"),
    "security-group": ("describe_security_groups", "SecurityGroups", "GroupId"),
    "route-table": ("describe_route_tables", "RouteTables", "RouteTableId"),
}
# The filter that selects a resource of each kind by its id (a filter, unlike
# the Ids parameters, answers an empty list rather than a NotFound error).
_ID_FILTER = {
    "vpc": "vpc-id",
    "subnet": "subnet-id",
    "internet-gateway": "internet-gateway-id",
    "security-group": "group-id",
    "route-table": "route-table-id",
}

# AWS codes meaning "that is already so": success for an idempotent call.
_ALREADY = frozenset(
    {"Resource.AlreadyAssociated", "InvalidPermission.Duplicate", "RouteAlreadyExists", "InvalidGroup.Duplicate"}
)


def tag_specifications(resource_type: str, tags: dict) -> list[dict]:
    """`TagSpecifications` for a create call: the tags are set atomically with the resource."""
    return [{"ResourceType": resource_type, "Tags": [{"Key": k, "Value": str(v)} for k, v in tags.items()]}]


def tag_filters(tags: dict) -> list[dict]:
    return [{"Name": f"tag:{k}", "Values": [str(v)]} for k, v in tags.items()]


def _call(operation: str, what: str, **kwargs) -> dict:
    try:
        return getattr(client("ec2"), operation)(**kwargs)
    except (ClientError, BotoCoreError) as exc:
        raise translate(exc, what) from exc


def _call_idempotent(operation: str, what: str, **kwargs) -> dict | None:
    """Like `_call`, but an "already done" answer is success (None)."""
    try:
        return _call(operation, what, **kwargs)
    except CloudError as exc:
        if exc.code in _ALREADY:
            return None
        raise


def find_tagged(kind: str, tags: dict) -> list[str]:
    """Ids of the `kind` resources carrying all `tags`, oldest first where AWS says."""
    operation, list_key, id_key = _DESCRIBE[kind]
    found = _call(operation, f"find {kind}", Filters=tag_filters(tags))
    return [item[id_key] for item in found.get(list_key, [])]


def exists(kind: str, resource_id: str) -> bool:
    """Whether the `kind` resource `resource_id` still exists (someone may have deleted it)."""
    operation, list_key, id_key = _DESCRIBE[kind]
    found = _call(operation, f"describe {resource_id}", Filters=[{"Name": _ID_FILTER[kind], "Values": [resource_id]}])
    return any(item[id_key] == resource_id for item in found.get(list_key, []))


def create_vpc(*, cidr: str, tags: dict) -> str:
    vpc_id = _call("create_vpc", "create VPC", CidrBlock=cidr, TagSpecifications=tag_specifications("vpc", tags))[
        "Vpc"
    ]["VpcId"]
    return vpc_id


def create_internet_gateway(*, tags: dict) -> str:
    return _call(
        "create_internet_gateway",
        "create internet gateway",
        TagSpecifications=tag_specifications("internet-gateway", tags),
    )["InternetGateway"]["InternetGatewayId"]


def attach_internet_gateway(*, igw_id: str, vpc_id: str) -> None:
    """Attach; attaching twice is fine."""
    _call_idempotent("attach_internet_gateway", "attach internet gateway", InternetGatewayId=igw_id, VpcId=vpc_id)


def create_subnet(*, vpc_id: str, cidr: str, tags: dict) -> str:
    return _call(
        "create_subnet",
        "create subnet",
        VpcId=vpc_id,
        CidrBlock=cidr,
        TagSpecifications=tag_specifications("subnet", tags),
    )["Subnet"]["SubnetId"]


def route_to_internet(*, vpc_id: str, igw_id: str) -> str:
    """Send 0.0.0.0/0 of the VPC's main route table to the internet gateway. Idempotent.

    The main table applies to every subnet without its own, so there is no
    table to create (and none to leak when a worker dies mid-way).
    """
    tables = _call(
        "describe_route_tables",
        "find main route table",
        Filters=[{"Name": "vpc-id", "Values": [vpc_id]}, {"Name": "association.main", "Values": ["true"]}],
    )["RouteTables"]
    if not tables:
        raise CloudError(f"VPC {vpc_id} has no main route table")
    table = tables[0]
    for route in table.get("Routes", []):
        if route.get("DestinationCidrBlock") == "0.0.0.0/0":
            if route.get("GatewayId") == igw_id:
                return table["RouteTableId"]
            _call(
                "replace_route",
                "route to internet",
                RouteTableId=table["RouteTableId"],
                DestinationCidrBlock="0.0.0.0/0",
                GatewayId=igw_id,
            )
            return table["RouteTableId"]
    _call_idempotent(
        "create_route",
        "route to internet",
        RouteTableId=table["RouteTableId"],
        DestinationCidrBlock="0.0.0.0/0",
        GatewayId=igw_id,
    )
    return table["RouteTableId"]


def create_security_group(*, vpc_id: str, name: str, description: str, tags: dict) -> str:
    """Create a group; if one of that name exists in the VPC (a lost earlier try), return it."""
    result = _call_idempotent(
        "create_security_group",
        f"create security group {name}",
        VpcId=vpc_id,
        GroupName=name,
        Description=description,
        TagSpecifications=tag_specifications("security-group", tags),
    )
    if result is not None:
        return result["GroupId"]
    groups = _call(
        "describe_security_groups",
        f"find security group {name}",
        Filters=[{"Name": "vpc-id", "Values": [vpc_id]}, {"Name": "group-name", "Values": [name]}],
    )["SecurityGroups"]
    if not groups:
        raise CloudError(f"security group {name} is said to exist but cannot be found")
    return groups[0]["GroupId"]


def allow_udp(*, group_id: str, port: int, cidr: str, description: str) -> None:
    """Allow inbound UDP `port` from `cidr`. Idempotent."""
    _call_idempotent(
        "authorize_security_group_ingress",
        f"open UDP {port}",
        GroupId=group_id,
        IpPermissions=[
            {
                "IpProtocol": "udp",
                "FromPort": port,
                "ToPort": port,
                "IpRanges": [{"CidrIp": cidr, "Description": description}],
            }
        ],
    )


def allow_all_from_group(*, group_id: str, source_group_id: str, description: str) -> None:
    """Allow all inbound traffic from members of `source_group_id`. Idempotent."""
    _call_idempotent(
        "authorize_security_group_ingress",
        "allow traffic from group",
        GroupId=group_id,
        IpPermissions=[
            {
                "IpProtocol": "-1",
                "UserIdGroupPairs": [{"GroupId": source_group_id, "Description": description}],
            }
        ],
    )


def ingress_rules(group_id: str) -> list[dict]:
    """The inbound rules of a group, as AWS describes them (for checks and tests)."""
    groups = _call("describe_security_groups", "describe security group", GroupIds=[group_id])["SecurityGroups"]
    return groups[0].get("IpPermissions", []) if groups else []


def deny_all_egress(group_id: str) -> None:
    """Remove a new group's default allow-all outbound rule, so it lets nothing out either. Idempotent."""
    try:
        _call(
            "revoke_security_group_egress",
            "close outbound traffic",
            GroupId=group_id,
            IpPermissions=[{"IpProtocol": "-1", "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}],
        )
    except CloudError as exc:
        if exc.code != "InvalidPermission.NotFound":  # already revoked
            raise


def egress_rules(group_id: str) -> list[dict]:
    """The outbound rules of a group, as AWS describes them (for checks and tests)."""
    groups = _call("describe_security_groups", "describe security group", GroupIds=[group_id])["SecurityGroups"]
    return groups[0].get("IpPermissionsEgress", []) if groups else []


def tag_resources(resource_ids: list[str], tags: dict) -> None:
    """Tag resources after the fact (CreateTags); used where a create call's own tags are not kept."""
    _call(
        "create_tags",
        "tag resources",
        Resources=resource_ids,
        Tags=[{"Key": k, "Value": str(v)} for k, v in tags.items()],
    )


def tagged_with_key(kind: str, key: str) -> list[tuple[str, dict]]:
    """`(id, tags)` of every `kind` resource carrying tag `key` (any value)."""
    operation, list_key, id_key = _DESCRIBE[kind]
    found = _call(operation, f"find {kind}", Filters=[{"Name": "tag-key", "Values": [key]}])
    return [(item[id_key], {t["Key"]: t["Value"] for t in item.get("Tags", [])}) for item in found.get(list_key, [])]


_DELETE = {
    "vpc": ("delete_vpc", "VpcId"),
    "subnet": ("delete_subnet", "SubnetId"),
    "security-group": ("delete_security_group", "GroupId"),
}


def delete(kind: str, resource_id: str) -> bool:
    """Delete a VPC, subnet or security group; False if it was already gone.

    Raises CloudError `DependencyViolation` while something still uses it
    (an instance not yet terminated): the caller tries again later.
    """
    operation, id_key = _DELETE[kind]
    try:
        _call(operation, f"delete {resource_id}", **{id_key: resource_id})
    except CloudError as exc:
        if isinstance(exc, ObjectNotFound) or exc.code.endswith(".NotFound"):
            return False
        raise
    return True
