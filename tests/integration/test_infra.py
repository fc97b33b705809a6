"""The deployment template, checked here without Azure: Bicep parses, checkov passes (every skip
justified and documented), every setting the app reads is set by the template with a value the app
accepts, roles are narrow, each Flex Consumption rule the template follows holds (one test per rule,
citing Microsoft's documentation), Easy Auth is off unless callers are named, and the Graph grant
script is idempotent and asks for tokens of the Graph root it calls (against a fake `az`)."""
from __future__ import annotations

import fnmatch
import json
import os
import re
import subprocess
import sys
from functools import lru_cache
from pathlib import Path
from typing import Any

import pytest
import yaml
from pycep import BicepParser

from shared.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
BICEP_FILES = sorted(INFRA.rglob("*.bicep"))
CHECKOV = ROOT / ".venv-tools" / "bin" / "checkov"
DEPLOY_DOC = ROOT / "docs" / "deploy.md"

# Read by the code but set by Azure itself on every Function App with a managed identity: the
# template must leave them alone.
PLATFORM_PROVIDED = {
    "IDENTITY_ENDPOINT": "App Service/Functions managed identity endpoint",
    "IDENTITY_HEADER": "its per-app secret header",
}
# Not settings of ours: what `requests` reads from any environment, read once instead of per request
# (shared/queues.py transport_options); the template has no reason to set them.
HTTP_CLIENT_ENVIRONMENT = {"REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"}
# Alternatives to what the template sets: shared-key access is off, so a connection string cannot
# work, and the service URIs are used instead of accountName so national clouds get their suffixes.
REPLACED_BY_IDENTITY = {"AzureWebJobsStorage", "AzureWebJobsStorage__accountName"}
IDENTITY_STORAGE = {"AzureWebJobsStorage__credential", "AzureWebJobsStorage__clientId",
                    "AzureWebJobsStorage__blobServiceUri", "AzureWebJobsStorage__queueServiceUri",
                    "AzureWebJobsStorage__tableServiceUri"}
# Flex Consumption rejects this app setting; functionAppConfig.runtime carries it.
SET_ELSEWHERE = {"FUNCTIONS_WORKER_RUNTIME"}
# Every checkov skip, each with its reason in the Bicep comment and in docs/deploy.md.
DOCUMENTED_SKIPS = {"CKV_AZURE_17", "CKV_AZURE_35", "CKV_AZURE_59", "CKV_AZURE_206", "CKV_AZURE_212",
                    "CKV_AZURE_213", "CKV_AZURE_222", "CKV_AZURE_225",
                    # Flex Consumption rejects or does not document what these want (functionapp.bicep).
                    "CKV_AZURE_18", "CKV_AZURE_67", "CKV_AZURE_78",
                    # Site-configuration checks that checkov also runs on the authsettingsV2 resource.
                    "CKV_AZURE_13", "CKV_AZURE_63", "CKV_AZURE_65", "CKV_AZURE_66", "CKV_AZURE_80", "CKV_AZURE_88"}
# Stand-ins for values only known after deployment, in the shapes Azure gives them.
OUTPUT_SAMPLES = {
    "identity.outputs.clientId": "0c6d1f7e-57a5-4a7b-8b55-7f4e3a1c2d90",
    "storage.outputs.blobEndpoint": "https://stabc.blob.core.windows.net/",
    "storage.outputs.queueEndpoint": "https://stabc.queue.core.windows.net/",
    "storage.outputs.tableEndpoint": "https://stabc.table.core.windows.net/",
    "monitoring.outputs.appInsightsConnectionString": "InstrumentationKey=00000000-0000-0000-0000-000000000000",
    "monitoring.outputs.logsIngestionEndpoint": "https://dcr-results-abc-eastus-1.logs.z1.ingest.monitor.azure.com",
    "monitoring.outputs.dcrImmutableId": "dcr-" + "0123456789abcdef" * 2,
}
# Settings whose deployed value differs from the app's default on purpose.
DECIDED_HERE = {"graph_endpoint", "results_sink", "logs_ingestion_endpoint", "logs_dcr_immutable_id",
                "default_service_principal_id", "default_job_id", "default_rule_id"}
ROLE_SCOPES = {  # role -> the only scopes it may be granted on (symbols in rbac.bicep)
    "blobDataOwner": {"storage"},
    "queueDataContributor": {"storage"},
    "tableDataContributor": {"storage"},
    "monitoringMetricsPublisher": {"dcr", "appInsights"},
}


@lru_cache(maxsize=None)
def parse(path: Path) -> dict[str, Any]:
    return BicepParser().parse(file_path=path)


# -- parsing -------------------------------------------------------------------------------------
def test_there_is_a_template():
    names = {p.relative_to(INFRA).as_posix() for p in BICEP_FILES}
    assert {"main.bicep", "modules/functionapp.bicep", "modules/storage.bicep", "modules/rbac.bicep",
            "modules/monitoring.bicep", "modules/identity.bicep"} <= names


@pytest.mark.parametrize("path", BICEP_FILES, ids=lambda p: p.relative_to(INFRA).as_posix())
def test_bicep_parses(path):
    tree = parse(path)
    assert tree.get("resources") or tree.get("modules")


def test_the_parser_rejects_broken_bicep():
    with pytest.raises(Exception):
        BicepParser().parse(text="resource site 'Microsoft.Web/sites@2024-04-01' = {\n  name: 'x'\n")


def test_every_referenced_file_exists():
    for path in BICEP_FILES:
        for module in parse(path).get("modules", {}).values():
            assert (path.parent / module["detail"]["path"]).is_file(), module
        for loaded in re.findall(r"loadJsonContent\('([^']+)'\)", path.read_text()):
            assert (path.parent / loaded).is_file(), loaded
    params = json.loads((INFRA / "main.parameters.json").read_text())["parameters"]
    assert set(params) <= set(parse(INFRA / "main.bicep")["parameters"])


# -- checkov -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def checkov_report() -> dict[str, Any]:
    assert CHECKOV.exists(), "checkov is missing: `make test` installs it into .venv-tools (requirements-tools.txt)"
    # --skip-download: no Prisma Cloud look-ups; the scan itself is entirely local.
    result = subprocess.run([str(CHECKOV), "-d", str(INFRA), "--framework", "bicep", "--compact", "--skip-download",
                             "-o", "json"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.stdout.strip(), result.stderr[-3000:]
    return json.loads(result.stdout)


def test_checkov_finds_no_failed_checks(checkov_report):
    summary = checkov_report["summary"]
    failed = [(c["check_id"], c["file_path"], c["resource"]) for c in checkov_report["results"]["failed_checks"]]
    assert failed == [] and summary["failed"] == 0
    assert summary["parsing_errors"] == 0
    assert summary["passed"] >= 15 and summary["resource_count"] >= 20  # it really scanned the template


def test_every_checkov_skip_is_justified_and_documented(checkov_report):
    skipped = checkov_report["results"]["skipped_checks"]
    assert {c["check_id"] for c in skipped} == DOCUMENTED_SKIPS
    for check in skipped:
        assert len(check["check_result"].get("suppress_comment", "")) > 30, check["check_id"]
    doc = DEPLOY_DOC.read_text()
    for check_id in DOCUMENTED_SKIPS:
        assert check_id in doc, f"{check_id} is skipped but docs/deploy.md does not say why"


# -- settings ------------------------------------------------------------------------------------
def app_settings() -> dict[str, Any]:
    return parse(INFRA / "main.bicep")["variables"]["appSettings"]["value"]


def env_names_read_in_shared() -> set[str]:
    pattern = re.compile(r"""os\.(?:environ\.get\(|environ\[|getenv\()\s*["']([A-Za-z_][A-Za-z0-9_]*)["']""")
    return {name for path in (ROOT / "shared").rglob("*.py") for name in pattern.findall(path.read_text())}


LOGIC = {"not": lambda ops, r: not r(ops["bool_value"]),
         "and": lambda ops, r: r(ops["operand_1"]) and r(ops["operand_2"]),
         "or": lambda ops, r: r(ops["operand_1"]) or r(ops["operand_2"]),
         "conditional": lambda ops, r: r(ops["true_value"] if r(ops["condition"]) else ops["false_value"])}
FUNCTIONS = {"empty": lambda args, r: not r(args["item_to_test"]),
             "replace": lambda args, r: r(args["original_string"]).replace(r(args["old_string"]),
                                                                           r(args["new_string"])),
             "split": lambda args, r: r(args["input_string"]).split(r(args["delimiter"]))}


def resolve(node: Any, tree: dict[str, Any], params: dict[str, Any] | None = None) -> Any:
    """A value of main.bicep as deployed with default parameters, or `params` where given (module
    outputs from OUTPUT_SAMPLES). pycep gives identifiers and string literals alike as str: a name of
    a param or variable wins."""
    params = params or {}

    def again(child: Any) -> Any:
        return resolve(child, tree, params)
    if node is None:
        return None
    if isinstance(node, str):
        if node in tree["parameters"]:
            return params.get(node, tree["parameters"][node].get("default"))
        if node in tree["variables"]:
            return again(tree["variables"][node]["value"])
        if "${" in node:
            return re.sub(r"\$\{([^}]+)\}", lambda m: str(again(m.group(1)) if m.group(1) in tree["parameters"]
                                                           else OUTPUT_SAMPLES.get(m.group(1), m.group(1))), node)
        return node
    if isinstance(node, (int, float, bool)):
        return node
    if isinstance(node, dict) and "function" in node and node["function"]["type"] == "string":
        return str(again(node["function"]["parameters"]["value_to_convert"]))
    if isinstance(node, dict) and "function" in node and node["function"]["type"] in FUNCTIONS:
        return FUNCTIONS[node["function"]["type"]](node["function"]["parameters"], again)
    if isinstance(node, dict) and "operator" in node and node["operator"]["type"] in LOGIC:
        return LOGIC[node["operator"]["type"]](node["operator"]["operands"], again)
    if isinstance(node, dict) and "operator" in node:
        op = node["operator"]
        first, second = op["operands"]["operand_1"], op["operands"]["operand_2"]
        if op["type"] == "property_accessor" and first in ("identity", "storage", "monitoring"):
            key = f"{first}.outputs.{second['operator']['operands']['operand_2']}"
            if key == "monitoring.outputs.streamName":
                dcr = json.loads((INFRA / "loganalytics" / "dcr.json").read_text())
                return dcr["properties"]["dataFlows"][0]["streams"][0]
            return OUTPUT_SAMPLES[key]
        if op["type"] == "property_accessor":
            return again(first)[second]
        if op["type"] == "index_accessor":
            return again(first)[again(second)]
    if isinstance(node, dict):
        return {k: again(v) for k, v in node.items()}
    if isinstance(node, list):
        return [again(v) for v in node]
    raise AssertionError(f"cannot resolve {node!r}")


def deployed_settings(**params: Any) -> dict[str, str]:
    tree = parse(INFRA / "main.bicep")
    return {name: resolve(value, tree, params) for name, value in app_settings().items()}


def test_env_scan_sees_what_shared_reads():
    # The scanner itself: shared/graph/credentials.py reads these two, so a scan that misses them is broken.
    assert {"IDENTITY_ENDPOINT", "IDENTITY_HEADER"} <= env_names_read_in_shared()


def test_every_setting_the_app_reads_is_set_by_the_template():
    aliases = {field.alias for field in Settings.model_fields.values() if field.alias}
    read = aliases | env_names_read_in_shared()
    set_here = set(app_settings())
    missing = read - set_here - set(PLATFORM_PROVIDED) - REPLACED_BY_IDENTITY - HTTP_CLIENT_ENVIRONMENT
    assert not missing, f"read by the app but not set in infra/main.bicep appSettings: {sorted(missing)}"
    assert IDENTITY_STORAGE <= set_here
    assert not set(PLATFORM_PROVIDED) & set_here, "never override what Azure sets for managed identity"
    assert not REPLACED_BY_IDENTITY & set_here, "a connection string or accountName would bypass the identity URIs"


def test_every_sample_setting_is_deployed():
    sample = json.loads((ROOT / "local.settings.sample.json").read_text())["Values"]
    missing = set(sample) - set(app_settings()) - REPLACED_BY_IDENTITY - SET_ELSEWHERE
    assert not missing, sorted(missing)
    site = parse(INFRA / "modules" / "functionapp.bicep")["resources"]["site"]["config"]
    assert site["properties"]["functionAppConfig"]["runtime"]["name"] == "python"


def test_the_template_values_pass_the_apps_own_validation(monkeypatch):
    values = deployed_settings()
    aliases = {field.alias for field in Settings.model_fields.values()}
    for name in list(os.environ):
        if name in aliases:
            monkeypatch.delenv(name)
    for name, value in values.items():  # app settings reach the app as environment variables
        monkeypatch.setenv(name, value)
    settings = Settings()
    assert settings.queue_service_uri == OUTPUT_SAMPLES["storage.outputs.queueEndpoint"]
    assert settings.azure_client_id == OUTPUT_SAMPLES["identity.outputs.clientId"]
    assert settings.graph_root == "https://graph.microsoft.com" and settings.graph_cloud == "Global"
    assert settings.logs_enabled and settings.logs_stream_name == "Custom-ProvisioningResults_CL"
    assert values["AzureWebJobsStorage__credential"] == "managedidentity"
    assert values["AzureWebJobsStorage__clientId"] == values["AZURE_CLIENT_ID"]
    assert values["APPLICATIONINSIGHTS_AUTHENTICATION_STRING"] == (
        f"ClientId={OUTPUT_SAMPLES['identity.outputs.clientId']};Authorization=AAD")
    # What the template does not decide it leaves empty, so that the app's defaults apply; what it
    # does decide (queues, Graph's documented 5 calls per 10 s) matches them.
    defaults = Settings.model_construct()
    for name, field in Settings.model_fields.items():
        if field.alias in values and field.alias not in IDENTITY_STORAGE | {"AZURE_CLIENT_ID"}:
            value = values[field.alias]
            assert value == "" or getattr(settings, name) == getattr(defaults, name) or name in DECIDED_HERE, name
    assert settings.rate_limit_calls == 5 and settings.rate_limit_window_seconds == 10


def test_every_queue_the_settings_name_is_created():
    tree = parse(INFRA / "main.bicep")
    created = set(resolve("allQueues", tree))
    values = deployed_settings()
    named = {values[n] for n in ("INTAKE_QUEUE", "WORK_QUEUE", "RESULTS_QUEUE", "DEADLETTER_QUEUE", "LEASE_QUEUE",
                                 "LOGS_QUEUE", "CALLBACK_QUEUE")}
    assert named == created
    storage = tree["modules"]["storage"]["config"]["params"]
    assert storage["queueNames"] == "allQueues"


def test_storage_is_keyless_and_the_app_uses_its_identity():
    account = parse(INFRA / "modules" / "storage.bicep")["resources"]["storage"]["config"]["properties"]
    assert account["allowSharedKeyAccess"] is False and account["allowBlobPublicAccess"] is False
    assert account["minimumTlsVersion"] == "TLS1_2" and account["defaultToOAuthAuthentication"] is True
    site = parse(INFRA / "modules" / "functionapp.bicep")["resources"]["site"]["config"]
    assert site["identity"]["type"] == "UserAssigned"
    auth = site["properties"]["functionAppConfig"]["deployment"]["storage"]["authentication"]
    assert auth == {"type": "UserAssignedIdentity", "userAssignedIdentityResourceId": "identityId"}
    assert site["properties"]["httpsOnly"] is True


def test_role_assignments_are_narrow():
    rbac = parse(INFRA / "modules" / "rbac.bicep")
    granted: dict[str, set[str]] = {}
    for name, resource in rbac["resources"].items():
        if resource["type"] != "Microsoft.Authorization/roleAssignments":
            continue
        config = resource["config"].get("config", resource["config"])  # loops nest one level deeper
        scope = config.get("scope")
        assert scope, f"{name} has no scope: it would apply to the whole resource group"
        if isinstance(scope, dict):
            scope = scope["operator"]["operands"]["operand_1"]
        role = config["properties"]["roleDefinitionId"]["function"]["parameters"]["resource_name_1"]
        role = role["operator"]["operands"]["operand_2"]
        assert config["properties"]["principalType"] == "ServicePrincipal"
        granted.setdefault(role, set()).add(scope)
    assert granted == ROLE_SCOPES
    role_ids = rbac["variables"]["roleIds"]["value"]
    # Owner, Contributor, User Access Administrator: never needed by the app.
    assert not {"8e3af657-a8ff-443c-a75c-2fe8c4bcb635", "b24988ac-6180-42a0-ab88-20f7382dd24c",
                "18d7d88d-d35e-4fb3-a5c3-7773c20a72d9"} & set(role_ids.values())
    containers = resolve("containerNames", parse(INFRA / "main.bicep"))
    assert {"azure-webjobs-hosts", "azure-webjobs-secrets"} <= set(containers)


def test_results_table_and_dcr_come_from_the_log_analytics_files():
    text = (INFRA / "modules" / "monitoring.bicep").read_text()
    assert "loadJsonContent('../loganalytics/table.json')" in text
    assert "loadJsonContent('../loganalytics/dcr.json')" in text
    table = json.loads((INFRA / "loganalytics" / "table.json").read_text())
    dcr = json.loads((INFRA / "loganalytics" / "dcr.json").read_text())
    stream = Settings.model_fields["logs_stream_name"].default
    assert dcr["properties"]["dataFlows"][0]["streams"] == [stream] and stream == f"Custom-{table['name']}"
    declared = dcr["properties"]["streamDeclarations"][stream]["columns"]
    columns = table["properties"]["schema"]["columns"]
    assert [(c["name"], c["type"]) for c in declared] == [(c["name"], c["type"]) for c in columns]


# -- Flex Consumption rules: one test per rule, each citing where Microsoft says it --------------
# App settings Flex Consumption deprecates (its configuration moved to functionAppConfig, or the
# feature does not exist there), and the feature flag that is the default everywhere now.
FLEX_DEPRECATED_SETTINGS = {
    "FUNCTIONS_WORKER_RUNTIME", "FUNCTIONS_WORKER_RUNTIME_VERSION", "FUNCTIONS_EXTENSION_VERSION",
    "WEBSITE_RUN_FROM_PACKAGE", "WEBSITE_CONTENTSHARE", "WEBSITE_CONTENTAZUREFILECONNECTIONSTRING",
    "WEBSITE_CONTENTOVERVNET", "WEBSITE_MOUNT_ENABLED", "WEBSITE_USE_PLACEHOLDER_DOTNETISOLATED",
    "SCM_DO_BUILD_DURING_DEPLOYMENT", "ENABLE_ORYX_BUILD", "WEBSITE_MAX_DYNAMIC_APPLICATION_SCALE_OUT",
    "WEBSITES_CONTAINER_START_TIME_LIMIT", "WEBSITE_TIME_ZONE", "TZ", "WEBSITE_LOAD_CERTIFICATES",
    "AzureWebJobsFeatureFlags",
}
FLEX_SITE_CONFIG = {"minTlsVersion", "appSettings"}  # what Microsoft's azd Flex quickstart sets, and no more
FLEX_PYTHON = {"3.10", "3.11", "3.12", "3.13"}
FLEX_INSTANCE_MEMORY_MB = {512, 2048, 4096}
# Flex Consumption regions without zone-redundant storage (redundancy-regions-zrs).
FLEX_REGIONS_WITHOUT_ZRS = {"westus", "westcentralus", "northcentralus", "ukwest", "southindia", "australiasoutheast"}
LRS_EVERYWHERE = {"Standard_LRS"}


def site_properties() -> dict[str, Any]:
    return parse(INFRA / "modules" / "functionapp.bicep")["resources"]["site"]["config"]["properties"]


def azd_default(name: str) -> str:
    """The default main.parameters.json gives a parameter when its azd variable is not set."""
    value = json.loads((INFRA / "main.parameters.json").read_text())["parameters"][name]["value"]
    match = re.fullmatch(r"\$\{([A-Z_]+)=([^}]*)\}", value)
    assert match, f"{name} is not taken from an azd variable with a default: {value}"
    return match.group(2)


def test_flex_site_sets_only_supported_site_config():
    """ARM rejects siteConfig.ftpsState on a Flex Consumption site (error 51021), and Flex documents no
    http20Enabled or cors: the site sets only what Microsoft's azd Flex quickstart sets.
    https://learn.microsoft.com/azure/azure-functions/functions-app-settings#flex-consumption-plan-deprecations
    https://learn.microsoft.com/azure/azure-functions/flex-consumption-plan#considerations"""
    assert set(site_properties()["siteConfig"]) <= FLEX_SITE_CONFIG
    for path in BICEP_FILES:
        code = "\n".join(line.split("//")[0] for line in path.read_text().splitlines())
        for name in ("ftpsState", "http20Enabled", "cors", "linuxFxVersion", "alwaysOn"):
            assert name not in code, f"{path.name} sets {name}, which a Flex Consumption site does not take"


def test_no_flex_deprecated_app_settings():
    """Flex Consumption deprecates these app settings (the runtime is functionAppConfig.runtime, the
    package is a blob container, there is no content share); worker indexing is the default now.
    https://learn.microsoft.com/azure/azure-functions/functions-app-settings#flex-consumption-plan-deprecations"""
    assert not FLEX_DEPRECATED_SETTINGS & set(app_settings())
    runtime = site_properties()["functionAppConfig"]["runtime"]
    assert runtime == {"name": "python", "version": "pythonVersion"}


def test_storage_sku_is_offered_in_every_flex_region():
    """The default storage redundancy must exist in every Flex Consumption region: ZRS does not in
    westus, westcentralus, northcentralus, ukwest, southindia, australiasoutheast. ZRS stays a choice.
    https://learn.microsoft.com/azure/storage/common/redundancy-regions-zrs"""
    main = parse(INFRA / "main.bicep")
    param = main["parameters"]["storageSkuName"]
    assert param["default"] in LRS_EVERYWHERE and azd_default("storageSkuName") in LRS_EVERYWHERE
    allowed = next(d["argument"] for d in param["decorators"] if d["type"] == "allowed")
    assert "Standard_ZRS" in allowed
    assert main["modules"]["storage"]["config"]["params"]["skuName"] == "storageSkuName"
    module = parse(INFRA / "modules" / "storage.bicep")["parameters"]["skuName"]
    assert module["default"] in LRS_EVERYWHERE
    assert FLEX_REGIONS_WITHOUT_ZRS  # the regions the default has to work in, named in the docstring


def allowed_and_default(name: str, tree: dict[str, Any]) -> tuple[set, Any]:
    param = tree["parameters"][name]
    return {v for d in param["decorators"] if d["type"] == "allowed" for v in d["argument"]}, param["default"]


def test_python_version_is_one_flex_runs_and_defaults_to_the_quickstarts():
    """Python on Flex Consumption: 3.12 in Microsoft's azd Flex quickstart, 3.13 also offered.
    https://learn.microsoft.com/azure/azure-functions/flex-consumption-plan#supported-language-stack-versions"""
    for tree in (parse(INFRA / "main.bicep"), parse(INFRA / "modules" / "functionapp.bicep")):
        allowed, default = allowed_and_default("pythonVersion", tree)
        assert allowed <= FLEX_PYTHON and default == "3.12"
    assert azd_default("pythonVersion") == "3.12"
    assert parse(INFRA / "main.bicep")["modules"]["functionApp"]["config"]["params"]["pythonVersion"] == "pythonVersion"


def test_instance_memory_and_scale_are_flex_values():
    """Flex Consumption instance sizes are 512, 2048 and 4096 MB; at most 1000 instances. The defaults
    (512 MB, 10 instances) come from the cost model in docs/deploy.md.
    https://learn.microsoft.com/azure/azure-functions/flex-consumption-plan#instance-sizes"""
    main, module = parse(INFRA / "main.bicep"), parse(INFRA / "modules" / "functionapp.bicep")
    for tree in (main, module):
        allowed, default = allowed_and_default("instanceMemoryMB", tree)
        assert allowed <= FLEX_INSTANCE_MEMORY_MB and default == 512
        bounds = {d["type"]: d["argument"] for d in tree["parameters"]["maximumInstanceCount"]["decorators"]}
        assert bounds["max_value"] <= 1000 and tree["parameters"]["maximumInstanceCount"]["default"] == 10
    assert azd_default("instanceMemoryMB") == "512" and azd_default("maximumInstanceCount") == "10"
    params = main["modules"]["functionApp"]["config"]["params"]
    assert params["instanceMemoryMB"] == "instanceMemoryMB" and params["maximumInstanceCount"] == "maximumInstanceCount"
    scale = site_properties()["functionAppConfig"]["scaleAndConcurrency"]
    assert scale == {"instanceMemoryMB": "instanceMemoryMB", "maximumInstanceCount": "maximumInstanceCount"}
    assert "Cost" in DEPLOY_DOC.read_text() and "scripts.cost_probe" in DEPLOY_DOC.read_text()


def test_the_dcr_waits_for_its_table():
    """A data collection rule whose output table ARM cannot see yet fails with InvalidOutputTable: the
    DCR depends on the table, and names its output stream after the table resource.
    https://learn.microsoft.com/azure/azure-monitor/logs/tutorial-logs-ingestion-api"""
    dcr = parse(INFRA / "modules" / "monitoring.bicep")["resources"]["dcr"]["config"]
    assert "resultsTable" in dcr["dependsOn"]
    flows = dcr["properties"]["dataFlows"]
    assert flows["config"]["function"]["parameters"]["arg_2"] == {"outputStream": "Custom-${resultsTable.name}"}


def test_blob_data_owner_is_granted_on_the_account():
    """The host creates the containers it needs, so Storage Blob Data Owner is granted on the account,
    as Microsoft's identity-based host storage guidance does.
    https://learn.microsoft.com/azure/azure-functions/functions-reference#connecting-to-host-storage-with-an-identity"""
    rbac = parse(INFRA / "modules" / "rbac.bicep")["resources"]
    assert rbac["blobOwner"]["config"]["scope"] == "storage"
    assert not [r for r in rbac.values() if r["type"].endswith("/containers")], "a per-container grant is back"


def test_the_template_deploys_to_the_public_cloud_only():
    """Flex Consumption is not offered in Azure Government, and a managed identity gets tokens only in
    its own cloud: the template names the global Graph root and no national-cloud choice; the docs say
    which clouds it deploys to and how to run the app elsewhere.
    https://learn.microsoft.com/azure/azure-functions/flex-consumption-how-to#view-currently-supported-regions"""
    values = deployed_settings()
    assert values["GRAPH_CLOUD"] == "Global" and values["GRAPH_ENDPOINT"] == "https://graph.microsoft.com"
    assert "graphCloud" not in parse(INFRA / "main.bicep")["parameters"]
    doc, readme = DEPLOY_DOC.read_text(), (ROOT / "README.md").read_text()
    assert "Azure Government" in doc and "Azure Government" in readme
    assert "deploy to Azure Government (`azd config set" not in doc


# -- Easy Auth -------------------------------------------------------------------------------------
APP_A, APP_B = "0f1c2d3e-4a5b-4c6d-8e7f-901234567890", "1a2b3c4d-5e6f-4a7b-8c9d-0e1f2a3b4c5d"
API_CLIENT = "2b3c4d5e-6f70-4a81-9b2c-3d4e5f607182"


def easy_auth(**params: Any) -> tuple[dict[str, str], Any]:
    """(the app settings, the Easy Auth module's params or None when it is not deployed) for `params`."""
    tree = parse(INFRA / "main.bicep")
    module = tree["modules"]["easyAuth"]["config"]
    if not resolve(module["condition"], tree, params):
        return deployed_settings(**params), None
    given = module["config"]["params"]
    return deployed_settings(**params), {name: resolve(given[name], tree, params)
                                         for name in ("clientId", "audiences", "allowedApplications")}


def test_easy_auth_is_off_by_default():
    settings, module = easy_auth()
    assert module is None
    assert settings["EASY_AUTH_ENABLED"] == "false"
    assert settings["ALLOWED_CLIENT_APP_IDS"] == "" and settings["ALLOWED_CLIENT_ROLES"] == ""


@pytest.mark.parametrize("ids,roles", [(f"{APP_A}, {APP_B}", ""), ("", "Provisioning.Submit"),
                                       (APP_A, "Provisioning.Submit,Provisioning.Admin")])
def test_naming_callers_turns_easy_auth_on_and_tells_the_app(ids, roles):
    """Callers named by client id and/or app role turn Easy Auth on; the app gets the same lists.
    https://learn.microsoft.com/azure/app-service/configure-authentication-provider-aad#use-a-built-in-authorization-policy"""
    settings, module = easy_auth(allowedClientAppIds=ids, allowedClientRoles=roles, easyAuthClientId=API_CLIENT)
    assert settings["EASY_AUTH_ENABLED"] == "true"
    assert settings["ALLOWED_CLIENT_APP_IDS"] == ids and settings["ALLOWED_CLIENT_ROLES"] == roles
    assert module["clientId"] == API_CLIENT and module["audiences"] == [f"api://{API_CLIENT}", API_CLIENT]
    assert module["allowedApplications"] == ([APP_A, APP_B] if "," in ids else [APP_A] if ids else [])


def test_easy_auth_lets_callers_without_a_token_through_to_keys_and_hmac():
    """Entra ID only, no login redirect, no token store; unauthenticated requests go on to the app
    (AllowAnonymous), where function keys and HMAC signatures are checked, and the app reads an Entra
    caller from X-MS-CLIENT-PRINCIPAL, which external requests cannot set. Easy Auth is supported on
    Flex Consumption (the plan's considerations no longer list it as a limitation).
    https://learn.microsoft.com/azure/app-service/overview-authentication-authorization#authorization-behavior
    https://learn.microsoft.com/azure/app-service/configure-authentication-user-identities"""
    auth = parse(INFRA / "modules" / "easyauth.bicep")["resources"]["site__auth"]
    assert auth["type"] == "Microsoft.Web/sites/config" and auth["config"]["name"] == "authsettingsV2"
    props = auth["config"]["properties"]
    assert props["platform"] == {"enabled": True}
    assert props["globalValidation"] == {"requireAuthentication": False, "unauthenticatedClientAction": "AllowAnonymous"}
    aad = props["identityProviders"]["azureActiveDirectory"]
    assert set(props["identityProviders"]) == {"azureActiveDirectory"} and aad["enabled"] is True
    assert aad["validation"]["allowedAudiences"] == "audiences"
    assert props["login"] == {"tokenStore": {"enabled": False}}
    main = parse(INFRA / "main.bicep")["parameters"]
    for name, variable in (("allowedClientAppIds", "ALLOWED_CLIENT_APP_IDS"), ("allowedClientRoles", "ALLOWED_CLIENT_ROLES"),
                           ("easyAuthClientId", "EASY_AUTH_CLIENT_ID")):
        assert main[name]["default"] == "" and azd_default(name) == ""
        assert variable in DEPLOY_DOC.read_text()


# -- azd -----------------------------------------------------------------------------------------
def test_azure_yaml_deploys_the_function_app_and_prints_the_grant():
    spec = yaml.safe_load((ROOT / "azure.yaml").read_text())
    assert spec["services"]["api"] == {"project": ".", "language": "python", "host": "function", "remoteBuild": True}
    assert spec["infra"]["path"] == "infra" and (INFRA / f"{spec['infra']['module']}.bicep").is_file()
    for platform in ("posix", "windows"):
        hook = spec["hooks"]["postprovision"][platform]
        assert hook["continueOnError"] is True and (ROOT / hook["run"]).is_file()
    site = parse(INFRA / "modules" / "functionapp.bicep")["resources"]["site"]["config"]
    assert "'azd-service-name': 'api'" in (INFRA / "modules" / "functionapp.bicep").read_text()
    assert site["kind"] == "functionapp,linux"


def test_funcignore_keeps_the_app_and_drops_the_rest():
    patterns = [p.strip() for p in (ROOT / ".funcignore").read_text().splitlines()
                if p.strip() and not p.startswith("#")]

    def ignored(path: str) -> bool:
        parts = path.split("/")
        return any(fnmatch.fnmatch(path, p) or fnmatch.fnmatch(parts[0] + "/", p) or fnmatch.fnmatch(parts[0], p)
                   for p in patterns)

    for kept in ["function_app.py", "host.json", "requirements.txt",
                 *[p.relative_to(ROOT).as_posix() for p in (ROOT / "shared").rglob("*.py")]]:
        assert not ignored(kept), kept
    for dropped in ["tests/integration/test_infra.py", "simulators/graph.py", "devhost/host.py", ".venv/bin/python",
                    "infra/main.bicep", "local.settings.json", "node_modules/x", "tools/cli.py", "tools/preflight.py"]:
        assert ignored(dropped), dropped


def test_shell_scripts_pass_shellcheck():
    shellcheck = ROOT / ".venv-tools" / "bin" / "shellcheck"
    assert shellcheck.exists(), "shellcheck is missing: `make test` installs it into .venv-tools"
    scripts = sorted(str(p) for p in (INFRA / "scripts").glob("*.sh"))
    assert len(scripts) >= 2
    result = subprocess.run([str(shellcheck), *scripts], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout


# -- the Graph grant script, against a fake az -----------------------------------------------------
FAKE_AZ = r'''#!{python}
"""Just enough of `az rest` for grant-graph-permission.sh: Graph state in a JSON file."""
import json, os, re, sys
import jmespath

args = sys.argv[1:]
if os.environ.get("FAKE_AZ_FAIL"):
    print("ERROR: Insufficient privileges to complete the operation.", file=sys.stderr); sys.exit(1)
opt = {{args[i]: args[i + 1] for i in range(1, len(args) - 1) if args[i].startswith("-")}}
state_path = os.environ["FAKE_AZ_STATE"]
state = json.load(open(state_path))
method, url = opt["--method"].upper(), opt["--url"]
state["calls"].append([method, url, opt.get("--body"), opt.get("--resource")])
# Like az, which derives a token audience only for the active (public) cloud's endpoints: a call to
# another Graph root without --resource, or with a token for another root, is refused.
root = re.match(r"^https://[^/]+", url).group(0)
if opt.get("--resource", "https://graph.microsoft.com") != root:
    json.dump(state, open(state_path, "w"))
    print(f"ERROR: Unauthorized: token audience {{opt.get('--resource')}} for {{root}}", file=sys.stderr); sys.exit(1)
path = re.sub(r"^https://[^/]+/v1.0", "", url).split("?")[0]
body = json.loads(opt["--body"]) if "--body" in opt else None
m = re.fullmatch(r"/servicePrincipals/([^/]+)/(appRoleAssignments|appRoleAssignedTo|owners|owners/\$ref)", path)
if path == "/servicePrincipals(appId='00000003-0000-0000-c000-000000000000')" and method == "GET":
    answer = state["graphSp"]
elif m and m.group(2) == "appRoleAssignments" and method == "GET":
    answer = {{"value": state["assignments"].get(m.group(1), [])}}
elif m and m.group(2) == "appRoleAssignedTo" and method == "POST" and m.group(1) == body["resourceId"]:
    state["assignments"].setdefault(body["principalId"], []).append(body); answer = body
elif m and m.group(2) == "owners" and method == "GET":
    answer = {{"value": state["owners"].get(m.group(1), [])}}
elif m and m.group(2) == "owners/$ref" and method == "POST":
    state["owners"].setdefault(m.group(1), []).append({{"id": body["@odata.id"].rsplit("/", 1)[1]}}); answer = None
else:
    print(f"fake az: no route for {{method}} {{url}}", file=sys.stderr); sys.exit(1)
json.dump(state, open(state_path, "w"))
if "--query" in opt:
    answer = jmespath.search(opt["--query"], answer)
if opt.get("--output") == "none" or opt.get("-o") == "none":
    pass
elif opt.get("-o") == "tsv" or opt.get("--output") == "tsv":
    for item in answer if isinstance(answer, list) else [answer]:
        print(item)
else:
    print(json.dumps(answer))
'''
GRAPH_SP = "5e1bd10b-6f0a-4d9e-9f2a-0d3b8f1c2a11"
SYNC_ROLE = "9492366f-7969-46a4-8d15-ed1a20078fff"
OWNED_ROLE = "18a4783c-866b-4cc7-a460-3d5e5662c884"
MI = "e7b2c4d8-1f3a-4b6c-8d9e-0a1b2c3d4e52"
USER_READ_ROLE = "df021288-bdef-4463-88db-98f22de89214"
GROUP_READ_ROLE = "5b567255-7703-4780-807c-7be8301ae99b"
APP_READ_ROLE = "9a5d68dd-52b0-4cc2-bd40-abcf44ac3a30"
TARGET = "c8c95753-f628-48e1-9fab-76c2d4cf624c"


@pytest.fixture
def fake_az(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    az = bin_dir / "az"
    az.write_text(FAKE_AZ.format(python=sys.executable))
    az.chmod(0o755)
    state = tmp_path / "graph.json"
    state.write_text(json.dumps({"calls": [], "assignments": {}, "owners": {}, "graphSp": {
        "id": GRAPH_SP, "appRoles": [
            {"id": USER_READ_ROLE, "value": "User.Read.All", "allowedMemberTypes": ["Application"]},
            {"id": SYNC_ROLE, "value": "Synchronization.ReadWrite.All", "allowedMemberTypes": ["Application"]},
            {"id": OWNED_ROLE, "value": "Application.ReadWrite.OwnedBy", "allowedMemberTypes": ["Application"]},
            {"id": GROUP_READ_ROLE, "value": "Group.Read.All", "allowedMemberTypes": ["Application"]},
            {"id": APP_READ_ROLE, "value": "Application.Read.All", "allowedMemberTypes": ["Application"]},
        ]}}))

    def run(*args: str, **env: str) -> tuple[subprocess.CompletedProcess, dict]:
        full_env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "FAKE_AZ_STATE": str(state), **env}
        result = subprocess.run(["bash", str(INFRA / "scripts" / "grant-graph-permission.sh"), *args],
                                capture_output=True, text=True, env=full_env, timeout=60)
        return result, json.loads(state.read_text())
    return run


def posts(state: dict) -> list:
    return [c for c in state["calls"] if c[0] == "POST"]


def test_grant_script_grants_sync_role_once(fake_az):
    first, state = fake_az("--principal-id", MI)
    assert first.returncode == 0, first.stderr
    assert "Granted: Microsoft Graph Synchronization.ReadWrite.All to " + MI in first.stdout
    assert state["assignments"][MI] == [{"principalId": MI, "resourceId": GRAPH_SP, "appRoleId": SYNC_ROLE}]
    again, state = fake_az("--principal-id", MI)
    assert again.returncode == 0 and "Skipped: " in again.stdout and "already has" in again.stdout
    assert len(posts(state)) == 1


def test_grant_script_owned_by_mode_adds_role_and_ownership_once(fake_az):
    first, state = fake_az("--principal-id", MI, "--mode", "ownedby", "--target-sp", TARGET)
    assert first.returncode == 0, first.stderr
    assert state["assignments"][MI][0]["appRoleId"] == OWNED_ROLE
    assert state["owners"][TARGET] == [{"id": MI}]
    assert f"Added: {MI} as an owner of service principal {TARGET}" in first.stdout
    owner_post = [c for c in posts(state) if c[1].endswith("/owners/$ref")]
    assert json.loads(owner_post[0][2]) == {"@odata.id": f"https://graph.microsoft.com/v1.0/directoryObjects/{MI}"}
    again, state = fake_az("--principal-id", MI, "--mode", "ownedby", "--target-sp", TARGET)
    assert again.stdout.count("Skipped: ") == 2 and len(posts(state)) == 2


def test_grant_script_posts_to_the_graph_resources_app_role_assigned_to(fake_az):
    """Graph's way to grant an app role to a service principal:
    https://learn.microsoft.com/graph/api/serviceprincipal-post-approleassignedto"""
    result, state = fake_az("--principal-id", MI)
    assert result.returncode == 0, result.stderr
    [post] = posts(state)
    assert post[1] == f"https://graph.microsoft.com/v1.0/servicePrincipals/{GRAPH_SP}/appRoleAssignedTo"


@pytest.mark.parametrize("cloud,root", [("Global", "https://graph.microsoft.com"),
                                        ("USGovL4", "https://graph.microsoft.us"),
                                        ("USGovL5", "https://dod-graph.microsoft.us")])
def test_grant_script_asks_for_tokens_of_the_graph_root_it_calls(fake_az, cloud, root):
    """`az rest` derives a token audience only from the active cloud's known endpoints; for any other
    root (dod-graph.microsoft.us) it must be told with --resource:
    https://learn.microsoft.com/cli/azure/reference-index#az-rest"""
    result, state = fake_az("--principal-id", MI, "--mode", "ownedby", "--target-sp", TARGET, "--cloud", cloud)
    assert result.returncode == 0, result.stderr
    assert len(posts(state)) == 2
    assert all(c[1].startswith(root + "/") and c[3] == root for c in state["calls"]), state["calls"]


def test_grant_script_directory_read_adds_the_three_read_roles_once(fake_az):
    first, state = fake_az("--principal-id", MI, "--directory-read")
    assert first.returncode == 0, first.stderr
    granted = {a["appRoleId"] for a in state["assignments"][MI]}
    assert granted == {SYNC_ROLE, USER_READ_ROLE, GROUP_READ_ROLE, APP_READ_ROLE}
    again, state = fake_az("--principal-id", MI, "--directory-read")
    assert again.stdout.count("Skipped: ") == 4 and len(posts(state)) == 4
    plain, state = fake_az("--principal-id", "a" + MI[1:])
    assert "Read.All" not in plain.stdout


def test_grant_script_takes_azd_outputs_cloud_and_dry_run(fake_az):
    result, state = fake_az("--dry-run", APP_IDENTITY_PRINCIPAL_ID=MI, GRAPH_CLOUD="USGovL4")
    assert result.returncode == 0, result.stderr
    assert "Would grant Microsoft Graph Synchronization.ReadWrite.All" in result.stdout
    assert not posts(state) and all(c[1].startswith("https://graph.microsoft.us/") for c in state["calls"])


@pytest.mark.parametrize("env,warned", [({"ALLOWED_CLIENT_ROLES": "Provisioning.Submit"}, True),
                                        ({"ALLOWED_CLIENT_APP_IDS": APP_A, "EASY_AUTH_CLIENT_ID": API_CLIENT}, False),
                                        ({}, False)])
def test_postprovision_warns_when_callers_are_named_without_the_api_client_id(env, warned):
    hook = INFRA / "scripts" / "postprovision.sh"
    result = subprocess.run(["sh", str(hook)], capture_output=True, text=True, timeout=60,
                            env={"PATH": os.environ["PATH"], "APP_IDENTITY_PRINCIPAL_ID": MI, **env})
    assert result.returncode == 0
    assert ("EASY_AUTH_CLIENT_ID is empty" in result.stdout) is warned


@pytest.mark.parametrize("args,message", [
    (["--principal-id", "not-a-guid"], "--principal-id must be the object id"),
    (["--principal-id", MI, "--mode", "ownedby"], "--mode ownedby needs --target-sp"),
    (["--principal-id", MI, "--cloud", "China"], "not offered in China"),
    (["--principal-id", f"{MI}') or true or ('"], "--principal-id must be the object id"),
])
def test_grant_script_refuses_bad_input_before_calling_graph(fake_az, args, message):
    result, state = fake_az(*args)
    assert result.returncode == 2 and message in result.stderr
    assert state["calls"] == []


def test_postprovision_hook_prints_the_command_and_never_fails(fake_az, tmp_path):
    env = {"PATH": os.environ["PATH"], "APP_IDENTITY_PRINCIPAL_ID": MI, "DEFAULT_SERVICE_PRINCIPAL_ID": TARGET,
           "AZURE_FUNCTION_URL": "https://func-x.azurewebsites.net"}
    hook = INFRA / "scripts" / "postprovision.sh"
    printed = subprocess.run(["sh", str(hook)], capture_output=True, text=True, env=env, timeout=60)
    assert printed.returncode == 0
    assert f"grant-graph-permission.sh --principal-id {MI} --cloud Global --mode sync" in printed.stdout
    assert f"--target-sp {TARGET}" in printed.stdout and "https://func-x.azurewebsites.net/api/health/deep" in printed.stdout
    # Opted in, but the deployer lacks the directory role: azd up must still succeed.
    failing = dict(env, PATH=f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}", FAKE_AZ_FAIL="1",
                   FAKE_AZ_STATE=str(tmp_path / "graph.json"), GRANT_GRAPH_PERMISSION="sync")
    tried = subprocess.run(["sh", str(hook)], capture_output=True, text=True, env=failing, timeout=60)
    assert tried.returncode == 0 and "did not go through" in tried.stdout
