#!/usr/bin/env bash
# Grant the app's managed identity the Microsoft Graph application permission that
# provisionOnDemand needs, with the Azure CLI (`az rest`). Idempotent: what exists is skipped.
#
#   --mode sync     Synchronization.ReadWrite.All (default): works for every enterprise app in the
#                   tenant, and job restarts work with it.
#   --mode ownedby  Application.ReadWrite.OwnedBy plus ownership of --target-sp: least privilege,
#                   limited to that app; restarting a job was reported to fail with it
#                   (microsoft-graph-docs-contrib issue 8800). See docs/deploy.md.
#
# Needs an az login as a Privileged Role Administrator (app role grants), plus owner-management
# rights on the target service principal for --mode ownedby. For US Gov clouds, `az cloud set
# --name AzureUSGovernment` first. Defaults come from the azd environment's outputs when set.
set -euo pipefail

GRAPH_APP_ID="00000003-0000-0000-c000-000000000000"
principal_id="${APP_IDENTITY_PRINCIPAL_ID:-}"
target_sp="${DEFAULT_SERVICE_PRINCIPAL_ID:-}"
cloud="${GRAPH_CLOUD:-Global}"
mode="sync"
dry_run=false

usage() {
  sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'
  echo
  echo "Usage: $0 --principal-id <identity object id> [--mode sync|ownedby] [--target-sp <object id>]"
  echo "          [--cloud Global|USGovL4|USGovL5] [--dry-run]"
}

while [ $# -gt 0 ]; do
  case "$1" in
    --principal-id) principal_id="${2:-}"; shift 2 ;;
    --mode) mode="${2:-}"; shift 2 ;;
    --target-sp) target_sp="${2:-}"; shift 2 ;;
    --cloud) cloud="${2:-}"; shift 2 ;;
    --dry-run) dry_run=true; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "Unknown argument: $1" >&2; usage >&2; exit 2 ;;
  esac
done

# Ids go into URLs and JSON bodies: accept GUIDs only, so nothing else can be smuggled in.
is_guid() { [[ "$1" =~ ^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$ ]]; }

if ! is_guid "$principal_id"; then
  echo "--principal-id must be the object id (GUID) of the app's managed identity (azd output APP_IDENTITY_PRINCIPAL_ID)." >&2
  exit 2
fi
case "$mode" in
  sync) role="Synchronization.ReadWrite.All" ;;
  ownedby)
    role="Application.ReadWrite.OwnedBy"
    if ! is_guid "$target_sp"; then
      echo "--mode ownedby needs --target-sp: the object id of the enterprise app's service principal (DEFAULT_SERVICE_PRINCIPAL_ID)." >&2
      exit 2
    fi ;;
  *) echo "--mode must be sync or ownedby, not '$mode'" >&2; exit 2 ;;
esac
case "$cloud" in
  Global) graph="https://graph.microsoft.com" ;;
  USGovL4) graph="https://graph.microsoft.us" ;;
  USGovL5) graph="https://dod-graph.microsoft.us" ;;
  *) echo "--cloud must be Global, USGovL4 or USGovL5 (provisionOnDemand is not offered in China)" >&2; exit 2 ;;
esac

say() { printf '%s\n' "$*"; }
# az rest picks a token audience only for the active cloud's known endpoints, so every call names the
# Graph root it goes to (dod-graph.microsoft.us would otherwise get no token, or the wrong one).
graph_rest() { az rest --resource "$graph" "$@"; }

# Microsoft Graph's own service principal in this tenant, and the id of the app role we need.
# (tsv prints the two values on one line or two depending on the az version: take words.)
found=$(graph_rest --method get \
  --url "$graph/v1.0/servicePrincipals(appId='$GRAPH_APP_ID')?\$select=id,appRoles" \
  --query "[id, appRoles[?value=='$role' && contains(allowedMemberTypes, 'Application')].id | [0]]" -o tsv \
  | tr -d '\r' | tr '\t' '\n')
graph_sp_id=$(printf '%s\n' "$found" | sed -n 1p)
role_id=$(printf '%s\n' "$found" | sed -n 2p)
if [ -z "$graph_sp_id" ] || [ -z "$role_id" ] || [ "$role_id" = "None" ]; then
  echo "Could not find Microsoft Graph's service principal or its app role $role in this tenant." >&2
  exit 1
fi

existing=$(graph_rest --method get \
  --url "$graph/v1.0/servicePrincipals/$principal_id/appRoleAssignments" \
  --query "length(value[?appRoleId=='$role_id' && resourceId=='$graph_sp_id'])" -o tsv | tr -d '\r')
if [ "$existing" != "0" ]; then
  say "Skipped: $principal_id already has Microsoft Graph $role."
elif $dry_run; then
  say "Would grant Microsoft Graph $role to $principal_id (dry run)."
else
  # Posted to the resource's appRoleAssignedTo, as Graph's grant-an-app-role guide does:
  # https://learn.microsoft.com/graph/api/serviceprincipal-post-approleassignedto
  graph_rest --method post \
    --url "$graph/v1.0/servicePrincipals/$graph_sp_id/appRoleAssignedTo" \
    --headers "Content-Type=application/json" \
    --body "{\"principalId\":\"$principal_id\",\"resourceId\":\"$graph_sp_id\",\"appRoleId\":\"$role_id\"}" \
    --output none
  say "Granted: Microsoft Graph $role to $principal_id."
fi

if [ "$mode" = "ownedby" ]; then
  # OwnedBy covers only what the identity owns: the enterprise app's service principal itself,
  # not (only) its app registration.
  owner=$(graph_rest --method get \
    --url "$graph/v1.0/servicePrincipals/$target_sp/owners?\$select=id" \
    --query "length(value[?id=='$principal_id'])" -o tsv | tr -d '\r')
  if [ "$owner" != "0" ]; then
    say "Skipped: $principal_id already owns service principal $target_sp."
  elif $dry_run; then
    say "Would add $principal_id as an owner of service principal $target_sp (dry run)."
  else
    graph_rest --method post \
      --url "$graph/v1.0/servicePrincipals/$target_sp/owners/\$ref" \
      --headers "Content-Type=application/json" \
      --body "{\"@odata.id\":\"$graph/v1.0/directoryObjects/$principal_id\"}" \
      --output none
    say "Added: $principal_id as an owner of service principal $target_sp."
  fi
fi

say "Managed identity tokens are cached for up to 24 hours: restart the Function App so that new tokens carry the role,"
say "then run the preflight: GET /api/health/deep (function key) or python -m shared.preflight."
