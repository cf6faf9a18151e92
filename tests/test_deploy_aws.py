"""The CloudFormation stack in deploy/aws/imagecache.yaml: linted, read, and deployed.

The stack goes into moto's CloudFormation on loopback, and the manager's AWS
pool then runs against the node group the stack made, each instance mapped to
a real cache node on 127.0.0.1 (moto's 10.x addresses are never connected to).
moto does not model every resource type: it skips those with a warning, and
what they must guarantee is checked here by reading the template instead.
"""

from __future__ import annotations

import asyncio
import base64
import re
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from cfnlint.decode import cfn_yaml  # type: ignore[import-untyped]

from cachenode.client import NodeClient
from cachenode.routing import parse_address
from imagecache.config import AwsConfig, Config, load_config
from manager.backends.aws import AwsPool
from tests.aws import REGION, aws_environment, moto_server  # noqa: F401
from tests.test_aws_pool import NodeFleet, fleet  # noqa: F401 (the fixture)

ROOT = Path(__file__).resolve().parent.parent
TEMPLATE = ROOT / "deploy" / "aws" / "imagecache.yaml"
NODE_PORT = 11311

# Resource types of the template that moto's CloudFormation does not model:
# it skips them (with the warning the deploying test ignores), so they are
# checked by reading the template.
NOT_MODELED_BY_MOTO = {"AWS::SecretsManager::Secret"}
# The secrets the stack takes; each must be NoEcho.
SECRET_PARAMETERS = {"DatabasePassword", "NodeToken", "ManagerToken", "ManagerPassword"}

PARAMETERS = {
    "OperatorCidr": "203.0.113.7/32",
    "ArtifactBucket": "imagecache-artifacts-test",
    "WheelKey": "releases/imagecache-0.1.0-py3-none-any.whl",
    "NodeCapacityMb": "512",
    "DatabasePassword": "Dbpassword0123456789",
    "NodeToken": "node-token-0123456789",
    "ManagerToken": "manager-token-0123456789",
    "ManagerPassword": "dashboard-0123456789",
    "AlertEmail": "operator@example.com",
}


# -- reading the template ----------------------------------------------------------


@pytest.fixture(scope="module")
def template() -> dict[str, Any]:
    """The template as data, short tags (!Ref, !Sub...) in their long form."""
    loaded: dict[str, Any] = cfn_yaml.load(str(TEMPLATE))
    return loaded


def resources_of_type(template: dict[str, Any], kind: str) -> dict[str, dict[str, Any]]:
    return {name: r for name, r in template["Resources"].items() if r["Type"] == kind}


def walk(value: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    """Every (path, value) in a nested template value, the value itself first."""
    yield path, value
    if isinstance(value, dict):
        for key, item in value.items():
            yield from walk(item, (*path, str(key)))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from walk(item, (*path, str(index)))


def names_referenced(value: Any) -> set[str]:
    """Every parameter or resource a value refers to, by Ref or inside a Fn::Sub."""
    names: set[str] = set()
    for _, item in walk(value):
        if isinstance(item, dict) and "Ref" in item:
            names.add(item["Ref"])
        if isinstance(item, dict) and "Fn::Sub" in item:
            text = item["Fn::Sub"] if isinstance(item["Fn::Sub"], str) else item["Fn::Sub"][0]
            names |= {m.split(".")[0] for m in re.findall(r"\$\{([^!}][^}]*)\}", text)}
    return names


def ingress_rules(template: dict[str, Any]) -> dict[str, set[tuple[int, int, str]]]:
    """Security group -> its (from port, to port, source) rules, inline or separate.

    A source is ``group:<logical id>`` or ``cidr:<literal or parameter>``.
    """
    rules: dict[str, set[tuple[int, int, str]]] = {
        name: set() for name in resources_of_type(template, "AWS::EC2::SecurityGroup")
    }

    def source(rule: dict[str, Any]) -> str:
        for key in ("CidrIp", "CidrIpv6"):
            if key in rule:
                value = rule[key]
                return "cidr:" + (value["Ref"] if isinstance(value, dict) else str(value))
        return "group:" + str(rule["SourceSecurityGroupId"]["Ref"])

    for name, group in resources_of_type(template, "AWS::EC2::SecurityGroup").items():
        for rule in group["Properties"].get("SecurityGroupIngress", ()):
            rules[name].add((int(rule["FromPort"]), int(rule["ToPort"]), source(rule)))
    for rule in resources_of_type(template, "AWS::EC2::SecurityGroupIngress").values():
        properties = rule["Properties"]
        rules[properties["GroupId"]["Ref"]].add(
            (int(properties["FromPort"]), int(properties["ToPort"]), source(properties))
        )
    return rules


def test_cfn_lint_passes_on_every_template_under_deploy() -> None:
    # As scripts/test runs it: errors and warnings both fail.
    cfn_lint = Path(sys.executable).parent / "cfn-lint"
    result = subprocess.run(
        [str(cfn_lint), "--non-zero-exit-code", "warning", "--", "deploy/**/*.yaml"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_secret_parameter_is_no_echo_and_reaches_only_secrets_manager(
    template: dict[str, Any],
) -> None:
    parameters = template["Parameters"]
    secret_like = {
        name for name in parameters if re.search(r"password|token|secret", name, re.IGNORECASE)
    }
    assert secret_like == SECRET_PARAMETERS
    for name in SECRET_PARAMETERS:
        assert parameters[name].get("NoEcho") in (True, "true"), f"{name} is not NoEcho"
        assert "Default" not in parameters[name], f"{name} has a default"
    # A secret parameter is copied into a Secrets Manager secret and nowhere else:
    # not into user data (readable by whoever may describe instances), not into outputs.
    for name, resource in template["Resources"].items():
        for key, value in resource.get("Properties", {}).items():
            used = names_referenced(value) & SECRET_PARAMETERS
            if used:
                assert resource["Type"] == "AWS::SecretsManager::Secret", (name, key, used)
                assert key == "SecretString", (name, key, used)
    assert not names_referenced(template.get("Outputs", {})) & SECRET_PARAMETERS


def test_no_literal_secret_in_the_template() -> None:
    text = TEMPLATE.read_text()
    # A secret setting is assigned from a variable or printf's %s, never a literal.
    literal = re.compile(
        r"(PASSWORD|TOKEN|SECRET_KEY)\s*=\s*(?![\"']?(%s|\$))[\"']?[^\s\"']{4,}", re.IGNORECASE
    )
    assert not literal.search(text), literal.search(text)
    assert 'MasterUserPassword: !Sub "{{resolve:secretsmanager:' in text
    # Nothing that looks like an AWS access key or a private key.
    assert not re.search(r"AKIA[0-9A-Z]{16}|BEGIN [A-Z ]*PRIVATE KEY", text)


def test_security_groups_reference_each_other_as_required(template: dict[str, Any]) -> None:
    rules = ingress_rules(template)
    assert rules["NodeSecurityGroup"] == {
        (NODE_PORT, NODE_PORT, "group:GatewaySecurityGroup"),
        (NODE_PORT, NODE_PORT, "group:ManagerSecurityGroup"),
    }
    assert rules["GatewaySecurityGroup"] == {(5000, 5000, "group:LoadBalancerSecurityGroup")}
    assert rules["ManagerSecurityGroup"] == {
        (5001, 5001, "cidr:OperatorCidr"),
        (5001, 5001, "group:GatewaySecurityGroup"),
    }
    assert rules["DatabaseSecurityGroup"] == {
        (3306, 3306, "group:GatewaySecurityGroup"),
        (3306, 3306, "group:ManagerSecurityGroup"),
    }
    assert rules["LoadBalancerSecurityGroup"] == {
        (80, 80, "cidr:SiteCidr"),
        (443, 443, "cidr:SiteCidr"),
    }
    # No literal range anywhere (0.0.0.0/0 least of all): only the parameters.
    every_source = {rule[2] for group in rules.values() for rule in group}
    assert {s for s in every_source if s.startswith("cidr:")} == {
        "cidr:OperatorCidr",
        "cidr:SiteCidr",
    }
    assert "Default" not in template["Parameters"]["OperatorCidr"]


def test_bucket_is_private_and_encrypted(template: dict[str, Any]) -> None:
    [bucket] = resources_of_type(template, "AWS::S3::Bucket").values()
    properties = bucket["Properties"]
    assert properties["PublicAccessBlockConfiguration"] == {
        "BlockPublicAcls": True,
        "BlockPublicPolicy": True,
        "IgnorePublicAcls": True,
        "RestrictPublicBuckets": True,
    }
    [rule] = properties["BucketEncryption"]["ServerSideEncryptionConfiguration"]
    assert rule["ServerSideEncryptionByDefault"]["SSEAlgorithm"] in ("AES256", "aws:kms")
    assert "AccessControl" not in properties
    assert not resources_of_type(template, "AWS::S3::BucketPolicy")


def test_database_is_private_and_encrypted(template: dict[str, Any]) -> None:
    [database] = resources_of_type(template, "AWS::RDS::DBInstance").values()
    properties = database["Properties"]
    assert properties["Engine"] == "mysql"
    assert properties["PubliclyAccessible"] is False
    assert properties["StorageEncrypted"] is True
    subnets = template["Resources"][properties["DBSubnetGroupName"]["Ref"]]["Properties"]
    assert names_referenced(subnets["SubnetIds"]) == {
        "PrivateSubnetA",
        "PrivateSubnetB",
        "PrivateSubnetIds",
    }


def policy_statements(template: dict[str, Any], role: str) -> list[dict[str, Any]]:
    """Every statement a role grants, inline or through its managed policies."""
    properties = template["Resources"][role]["Properties"]
    documents = [p["PolicyDocument"] for p in properties.get("Policies", ())]
    for managed in properties.get("ManagedPolicyArns", ()):
        documents.append(template["Resources"][managed["Ref"]]["Properties"]["PolicyDocument"])
    return [statement for document in documents for statement in document["Statement"]]


def actions_of(statement: dict[str, Any]) -> list[str]:
    action = statement["Action"]
    return [action] if isinstance(action, str) else list(action)


def test_roles_grant_least_privilege(template: dict[str, Any]) -> None:
    for role in resources_of_type(template, "AWS::IAM::Role"):
        for statement in policy_statements(template, role):
            assert statement["Effect"] == "Allow"
            assert all("*" not in action for action in actions_of(statement)), statement
            if statement.get("Resource") == "*":
                # Only calls that take no resource, or one held by a condition.
                assert all(
                    a.split(":")[1].startswith(("Describe", "GetMetric"))
                    or "Condition" in statement
                    for a in actions_of(statement)
                ), statement

    gateway = policy_statements(template, "GatewayRole")
    [objects] = [s for s in gateway if "s3:PutObject" in actions_of(s)]
    assert sorted(actions_of(objects)) == ["s3:DeleteObject", "s3:GetObject", "s3:PutObject"]
    assert objects["Resource"] == {"Fn::Sub": "${ImageBucket.Arn}/images/*"}
    [listing] = [s for s in gateway if "s3:ListBucket" in actions_of(s)]
    assert listing["Resource"] == {"Fn::GetAtt": ["ImageBucket", "Arn"]}
    [condition] = listing["Condition"].values()
    assert condition == {"s3:prefix": ["images/", "images/*"]}

    manager = policy_statements(template, "ManagerRole")
    [resize] = [s for s in manager if "autoscaling:SetDesiredCapacity" in actions_of(s)]
    assert sorted(actions_of(resize)) == [
        "autoscaling:SetDesiredCapacity",
        "autoscaling:TerminateInstanceInAutoScalingGroup",
    ]
    assert "autoScalingGroupName/${NodeGroup}" in resize["Resource"]["Fn::Sub"]
    [metrics] = [s for s in manager if "cloudwatch:PutMetricData" in actions_of(s)]
    assert metrics["Condition"] == {"StringEquals": {"cloudwatch:namespace": "imagecache"}}
    [publish] = [s for s in manager if "sns:Publish" in actions_of(s)]
    assert publish["Resource"] == {"Ref": "AlertTopic"}
    # Nodes read their wheel and their token, nothing else.
    node = policy_statements(template, "NodeRole")
    assert sorted(a for s in node for a in actions_of(s)) == [
        "s3:GetObject",
        "secretsmanager:GetSecretValue",
    ]


def test_node_group_sends_its_scale_events_to_the_topic(template: dict[str, Any]) -> None:
    group = template["Resources"]["NodeGroup"]["Properties"]
    assert (group["MinSize"], group["MaxSize"]) == ("1", "8")
    # A stack update must not undo the manager's resizes.
    assert "DesiredCapacity" not in group
    [notifications] = group["NotificationConfigurations"]
    assert notifications["TopicARN"] == {"Ref": "AlertTopic"}
    assert {"autoscaling:EC2_INSTANCE_LAUNCH", "autoscaling:EC2_INSTANCE_TERMINATE"} <= set(
        notifications["NotificationTypes"]
    )
    [topic] = resources_of_type(template, "AWS::SNS::Topic").values()
    assert topic["Properties"]["Subscription"] == [
        {"Protocol": "email", "Endpoint": {"Ref": "AlertEmail"}}
    ]


def test_gateways_sit_behind_the_load_balancer_with_a_health_check(
    template: dict[str, Any],
) -> None:
    resources = template["Resources"]
    gateways = resources["GatewayGroup"]["Properties"]
    assert gateways["TargetGroupARNs"] == [{"Ref": "GatewayTargets"}]
    # A gateway failing the load balancer's check is replaced.
    assert gateways["HealthCheckType"] == "ELB"
    targets = resources["GatewayTargets"]["Properties"]
    assert (targets["Protocol"], targets["Port"]) == ("HTTP", 5000)
    assert targets["HealthCheckPath"] == "/"
    assert targets["Matcher"] == {"HttpCode": "200"}
    balancer = resources["LoadBalancer"]["Properties"]
    assert balancer["Scheme"] == "internet-facing"
    assert balancer["SecurityGroups"] == [{"Ref": "LoadBalancerSecurityGroup"}]
    # The site and the dashboard are what the stack hands back.
    assert {"SiteUrl", "DashboardUrl", "NodeGroupName"} <= set(template["Outputs"])


# -- deploying into moto -----------------------------------------------------------


@pytest.fixture
async def clients(
    moto_server: str,  # noqa: F811
    aws_environment: None,  # noqa: F811
) -> AsyncIterator[dict[str, Any]]:
    session = get_session()
    async with (
        session.create_client(
            "cloudformation",
            region_name=REGION,
            endpoint_url=moto_server,
            # moto builds the whole stack inside CreateStack, slowly on a busy
            # machine: wait for it rather than retry (which finds the stack there).
            config=AioConfig(read_timeout=600, retries={"total_max_attempts": 1}),
        ) as cloudformation,
        session.create_client("autoscaling", region_name=REGION, endpoint_url=moto_server) as asg,
        session.create_client("ec2", region_name=REGION, endpoint_url=moto_server) as ec2,
    ):
        yield {"cloudformation": cloudformation, "autoscaling": asg, "ec2": ec2}


async def create_stack(cloudformation: Any, name: str) -> dict[str, Any]:
    """Create the stack from the template and wait for it; its description."""
    await cloudformation.create_stack(
        StackName=name,
        TemplateBody=TEMPLATE.read_text(),
        Parameters=[{"ParameterKey": k, "ParameterValue": v} for k, v in PARAMETERS.items()],
        Capabilities=["CAPABILITY_IAM"],
    )
    for _ in range(200):
        [stack] = (await cloudformation.describe_stacks(StackName=name))["Stacks"]
        if not stack["StackStatus"].endswith("IN_PROGRESS"):
            break
        await asyncio.sleep(0.05)
    assert stack["StackStatus"] == "CREATE_COMPLETE", stack
    result: dict[str, Any] = stack
    return result


def check_user_data(encoded: str, tmp_path: Path, name: str) -> str:
    """The decoded script, checked with ``bash -n``."""
    script = base64.b64decode(encoded).decode()
    path = tmp_path / f"{name}.sh"
    path.write_text(script)
    result = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    # Sub replaced every name but those of the secrets moto does not model (which
    # AWS replaces with their ARNs); no secret value is in the script.
    assert set(re.findall(r"\$\{([A-Za-z:]+)\}", script)) <= {
        "DatabasePasswordSecret",
        "NodeTokenSecret",
        "ManagerTokenSecret",
        "ManagerPasswordSecret",
        "CookieKeySecret",
    }
    for secret in SECRET_PARAMETERS:
        assert PARAMETERS[secret] not in script
    return script


def settings_of(script: str, tmp_path: Path, name: str, environ: dict[str, str]) -> Config:
    """The configuration a service gets: the TOML file the script writes, and
    the environment file's variables (values made up here), loaded as at start."""
    match = re.search(r"<<'SETTINGS'\n(.*?)\nSETTINGS\n", script, re.DOTALL)
    assert match is not None, "no settings file in the script"
    path = tmp_path / f"{name}.toml"
    path.write_text(match.group(1))
    written = set(re.findall(r"printf '(IMAGECACHE_[A-Z_]+)=", script))
    assert written == set(environ), written
    return load_config(path, environ)


async def launch_template_user_data(ec2: Any, template_id: str) -> str:
    versions = await ec2.describe_launch_template_versions(LaunchTemplateId=template_id)
    data: str = versions["LaunchTemplateVersions"][0]["LaunchTemplateData"]["UserData"]
    return data


# moto skips the Secrets Manager secrets with this warning (raised in its server thread).
@pytest.mark.filterwarnings(r"ignore:Tried to parse AWS..SecretsManager..Secret :UserWarning")
async def test_stack_deploys_and_the_manager_pool_drives_its_node_group(
    clients: dict[str, Any],
    template: dict[str, Any],
    fleet: NodeFleet,  # noqa: F811 (the fixture)
    moto_server: str,  # noqa: F811
    tmp_path: Path,
) -> None:
    cloudformation, autoscaling, ec2 = (
        clients["cloudformation"],
        clients["autoscaling"],
        clients["ec2"],
    )
    stack = await create_stack(cloudformation, "imagecache-test")
    outputs = {o["OutputKey"]: o["OutputValue"] for o in stack["Outputs"]}
    assert outputs["SiteUrl"].startswith("http://")
    assert re.fullmatch(r"http://[\d.]+:5001/", outputs["DashboardUrl"])

    # Everything moto models was made: only the secrets were skipped.
    listed = (await cloudformation.list_stack_resources(StackName="imagecache-test"))[
        "StackResourceSummaries"
    ]
    made = {r["LogicalResourceId"]: r["PhysicalResourceId"] for r in listed}
    wanted = {
        name
        for name, resource in template["Resources"].items()
        if resource["Type"] not in NOT_MODELED_BY_MOTO
        and resource.get("Condition") not in ("Https",)  # no CertificateArn given
    }
    assert wanted <= set(made)

    # The node group as the template has it.
    group_name = outputs["NodeGroupName"]
    [group] = (await autoscaling.describe_auto_scaling_groups(AutoScalingGroupNames=[group_name]))[
        "AutoScalingGroups"
    ]
    assert (group["MinSize"], group["MaxSize"], group["DesiredCapacity"]) == (1, 8, 1)

    # The node port, as moto holds the groups: from the gateway and manager groups only.
    groups = await ec2.describe_security_groups(GroupIds=[made["NodeSecurityGroup"]])
    [node_group] = groups["SecurityGroups"]
    [permission] = node_group["IpPermissions"]
    assert (permission["FromPort"], permission["ToPort"]) == (NODE_PORT, NODE_PORT)
    assert permission.get("IpRanges", []) == []
    assert {pair["GroupId"] for pair in permission["UserIdGroupPairs"]} == {
        made["GatewaySecurityGroup"],
        made["ManagerSecurityGroup"],
    }

    # User data: the node's runs `imagecache node` under systemd with its token.
    node_script = check_user_data(
        await launch_template_user_data(ec2, made["NodeLaunchTemplate"]), tmp_path, "node"
    )
    assert re.search(
        r"^ExecStart=/opt/imagecache/bin/imagecache node --host 0\.0\.0\.0 --port 11311"
        r" --capacity-mb 512$",
        node_script,
        re.MULTILINE,
    )
    assert "EnvironmentFile=/etc/imagecache/node.env" in node_script
    assert "printf 'IMAGECACHE_NODE_TOKEN=%s\\n' \"$token\"" in node_script
    assert "systemctl enable --now imagecache-node.service" in node_script
    assert "s3://imagecache-artifacts-test/releases/imagecache-0.1.0-py3-none-any.whl" in (
        node_script
    )
    gateway_script = check_user_data(
        await launch_template_user_data(ec2, made["GatewayLaunchTemplate"]), tmp_path, "gateway"
    )
    assert "ExecStart=/opt/imagecache/bin/imagecache gateway" in gateway_script
    attribute = await ec2.describe_instance_attribute(
        InstanceId=made["ManagerInstance"], Attribute="userData"
    )
    manager_script = check_user_data(attribute["UserData"]["Value"], tmp_path, "manager")
    # The settings files and environments load and validate as the services do.
    secrets = {
        "IMAGECACHE_METADATA_URL": "mysql+aiomysql://imagecache:pw@db.example:3306/imagecache",
        "IMAGECACHE_NODE_TOKEN": "node-token-0123456789",
        "IMAGECACHE_MANAGER_TOKEN": "manager-token-0123456789",
    }
    manager = settings_of(
        manager_script,
        tmp_path,
        "manager",
        {
            **secrets,
            "IMAGECACHE_MANAGER_PASSWORD": "dashboard-0123456789",
            "IMAGECACHE_SNS_TOPIC_ARN": outputs["AlertTopicArn"],
        },
    )
    assert (manager.manager.pool, manager.manager.asg_name) == ("aws", group_name)
    assert (manager.manager.host, manager.manager.port) == ("0.0.0.0", 5001)
    assert manager.manager.metrics == "cloudwatch"
    assert (manager.blobs.backend, manager.blobs.bucket) == ("s3", outputs["ImageBucketName"])
    gateway = settings_of(
        gateway_script,
        tmp_path,
        "gateway",
        {**secrets, "IMAGECACHE_SECRET_KEY": "cookie-key-0123456789"},
    )
    assert (gateway.gateway.host, gateway.gateway.port) == ("0.0.0.0", 5000)
    assert gateway.gateway.nodes == ()
    assert re.fullmatch(r"http://10\.42\.[\d.]+:5001", gateway.gateway.manager_url)
    assert gateway.blobs.prefix == "images/"

    # The manager's pool drives the group the stack made.
    async with AwsPool(
        group_name,
        NODE_PORT,
        AwsConfig(REGION, moto_server),
        resolve_address=fleet.resolve,
        ready_timeout=30,
        poll_seconds=0.05,
    ) as pool:
        [first] = await pool.nodes()
        [second] = await pool.grow(1)
        both = await pool.nodes()
        assert {h.node_id for h in both} == {first.node_id, second.node_id}
        for handle in both:
            host, port = parse_address(handle.address)
            assert host == "127.0.0.1"
            async with NodeClient(host, port) as client:
                assert await client.ping()
        await pool.shrink([first.node_id])
        assert await pool.nodes() == [second]
    [group] = (await autoscaling.describe_auto_scaling_groups(AutoScalingGroupNames=[group_name]))[
        "AutoScalingGroups"
    ]
    assert group["DesiredCapacity"] == 1
    # moto handed out 10.x addresses in the stack's private subnets; none was used.
    assert all(ip.startswith("10.42.") for ip in fleet.private_ips.values())


# -- scripts/deploy-aws (its AWS calls were tried against a moto server by hand) ---------

DEPLOY_SCRIPT = ROOT / "scripts" / "deploy-aws"


def run_deploy_script(*args: str) -> subprocess.CompletedProcess[str]:
    # Arguments are checked before anything reaches AWS: no credentials needed.
    return subprocess.run(
        [str(DEPLOY_SCRIPT), *args], capture_output=True, text=True, timeout=30, cwd=ROOT
    )


def test_deploy_script_is_bash_clean_and_documents_itself() -> None:
    assert subprocess.run(["bash", "-n", str(DEPLOY_SCRIPT)]).returncode == 0
    helped = run_deploy_script("--help")
    assert helped.returncode == 0
    assert helped.stdout.startswith("Usage: scripts/deploy-aws")
    for option in ("--operator-cidr", "--alert-email", "--region", "--wheel", "--param"):
        assert option in helped.stdout
    unknown = run_deploy_script("--frobnicate")
    assert unknown.returncode == 2
    assert "unknown option --frobnicate" in unknown.stderr


def test_deploy_script_refuses_a_secret_on_the_command_line_without_echoing_it() -> None:
    refused = run_deploy_script("--param", "ManagerPassword=hunter2-but-longer")
    assert refused.returncode == 2
    assert "ManagerPassword in the environment" in refused.stderr
    assert "hunter2" not in refused.stdout + refused.stderr
