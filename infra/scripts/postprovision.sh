#!/bin/sh
# azd postprovision hook. Granting a Graph app role needs a Privileged Role Administrator, which
# the person running `azd up` often is not: so by default this only prints the command to run.
# With GRANT_GRAPH_PERMISSION=sync or ownedby in the azd environment it tries the grant itself,
# and a failure still leaves `azd up` green (the preflight will say what is missing).
cd "$(dirname "$0")/../.." || exit 0
principal="${APP_IDENTITY_PRINCIPAL_ID:-<identity object id>}"
mode="${GRANT_GRAPH_PERMISSION:-}"
target="${DEFAULT_SERVICE_PRINCIPAL_ID:-<enterprise app service principal object id>}"
cloud="${GRAPH_CLOUD:-Global}"

echo ""
echo "Next: give the app's identity ($principal) its Microsoft Graph permission. As a Privileged Role Administrator, run one of:"
echo "  infra/scripts/grant-graph-permission.sh --principal-id $principal --cloud $cloud --mode sync"
echo "  infra/scripts/grant-graph-permission.sh --principal-id $principal --cloud $cloud --mode ownedby --target-sp $target"
echo "  (PowerShell: infra/scripts/grant-graph-permission.ps1 -PrincipalId $principal -Cloud $cloud [-Mode OwnedBy -TargetServicePrincipalId $target])"
echo "docs/deploy.md explains which to choose. Then restart the Function App and run the preflight:"
echo "  curl -H \"x-functions-key: <key>\" ${AZURE_FUNCTION_URL:-https://<app>.azurewebsites.net}/api/health/deep"

if [ -n "${ALLOWED_CLIENT_APP_IDS:-}${ALLOWED_CLIENT_ROLES:-}" ] && [ -z "${EASY_AUTH_CLIENT_ID:-}" ]; then
  echo ""
  echo "Warning: ALLOWED_CLIENT_APP_IDS / ALLOWED_CLIENT_ROLES turn Entra ID sign-in on, but EASY_AUTH_CLIENT_ID is empty:"
  echo "  no token can name this API as its audience, so every Entra ID caller is refused. Run"
  echo "  azd env set EASY_AUTH_CLIENT_ID <client id of the API's app registration> && azd provision"
fi

case "$mode" in
  sync|ownedby)
    echo ""
    echo "GRANT_GRAPH_PERMISSION=$mode: trying the grant now."
    if ! bash infra/scripts/grant-graph-permission.sh --principal-id "$principal" --cloud "$cloud" \
        --mode "$mode" --target-sp "${DEFAULT_SERVICE_PRINCIPAL_ID:-}"; then
      echo "The grant did not go through (see above); run the command above as a Privileged Role Administrator."
    fi ;;
esac
exit 0
