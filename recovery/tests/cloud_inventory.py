"""What exists in (moto's) cloud: the tests count it to prove nothing was created twice."""

from reclo_site.cloud.clients import client


def inventory(tenant: int | None = None) -> dict:
    ec2 = client("ec2")
    tags = [{"Name": "tag:reclo:tenant", "Values": [str(tenant)]}] if tenant is not None else []
    live = {"Name": "instance-state-name", "Values": ["pending", "running", "stopping", "stopped"]}
    instances = [
        i
        for r in ec2.describe_instances(Filters=[*tags, live])["Reservations"]
        for i in r["Instances"]
        if any(t["Key"] == "reclo:managed" for t in i.get("Tags", []))
    ]

    def role(item):
        return {t["Key"]: t["Value"] for t in item.get("Tags", [])}.get("reclo:role")

    return {
        "servers": sum(role(i) == "server" for i in instances),
        "gateways": sum(role(i) == "vpn-gateway" for i in instances),
        "images": len(
            ec2.describe_images(Owners=["self"], Filters=[{"Name": "name", "Values": ["reclo-*"]}])["Images"]
        ),
        "snapshots": len(
            ec2.describe_snapshots(OwnerIds=["self"], Filters=[{"Name": "tag:reclo:role", "Values": ["server-disk"]}])[
                "Snapshots"
            ]
        ),
        "addresses": len(
            ec2.describe_addresses(Filters=[{"Name": "tag:reclo:managed", "Values": ["true"]}])["Addresses"]
        ),
        "vpcs": len(ec2.describe_vpcs(Filters=[*tags, {"Name": "tag:reclo:role", "Values": ["vpc"]}])["Vpcs"]),
    }


def drill_inventory() -> dict:
    """Everything a drill's aws sandbox may have made that still exists (tag `reclo:drill`, any value)."""
    ec2 = client("ec2")
    drill = [{"Name": "tag-key", "Values": ["reclo:drill"]}]
    live = {"Name": "instance-state-name", "Values": ["pending", "running", "stopping", "stopped", "shutting-down"]}
    return {
        "instances": sum(len(r["Instances"]) for r in ec2.describe_instances(Filters=[*drill, live])["Reservations"]),
        "images": len(
            ec2.describe_images(Owners=["self"], Filters=[{"Name": "name", "Values": ["reclo-drill-*"]}])["Images"]
        ),
        "snapshots": len(ec2.describe_snapshots(OwnerIds=["self"], Filters=drill)["Snapshots"]),
        "vpcs": len(ec2.describe_vpcs(Filters=drill)["Vpcs"]),
        "subnets": len(ec2.describe_subnets(Filters=drill)["Subnets"]),
        "security_groups": len(ec2.describe_security_groups(Filters=drill)["SecurityGroups"]),
    }


NOTHING = {"instances": 0, "images": 0, "snapshots": 0, "vpcs": 0, "subnets": 0, "security_groups": 0}
