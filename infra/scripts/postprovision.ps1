# azd postprovision hook (Windows). Granting a Graph app role needs a Privileged Role
# Administrator, which the person running `azd up` often is not: so by default this only prints
# the command to run. With GRANT_GRAPH_PERMISSION=sync or ownedby it tries the grant itself, and a
# failure still leaves `azd up` green (the preflight will say what is missing).
$principal = if ($env:APP_IDENTITY_PRINCIPAL_ID) { $env:APP_IDENTITY_PRINCIPAL_ID } else { '<identity object id>' }
$target = if ($env:DEFAULT_SERVICE_PRINCIPAL_ID) { $env:DEFAULT_SERVICE_PRINCIPAL_ID } else { '<enterprise app service principal object id>' }
$cloud = if ($env:GRAPH_CLOUD) { $env:GRAPH_CLOUD } else { 'Global' }
$url = if ($env:AZURE_FUNCTION_URL) { $env:AZURE_FUNCTION_URL } else { 'https://<app>.azurewebsites.net' }
$script = Join-Path $PSScriptRoot 'grant-graph-permission.ps1'

Write-Output ''
Write-Output "Next: give the app's identity ($principal) its Microsoft Graph permission. As a Privileged Role Administrator, run one of:"
Write-Output "  $script -PrincipalId $principal -Cloud $cloud"
Write-Output "  $script -PrincipalId $principal -Cloud $cloud -Mode OwnedBy -TargetServicePrincipalId $target"
Write-Output 'docs/deploy.md explains which to choose. Then restart the Function App and run the preflight:'
Write-Output "  curl -H 'x-functions-key: <key>' $url/api/health/deep"

if (($env:ALLOWED_CLIENT_APP_IDS -or $env:ALLOWED_CLIENT_ROLES) -and -not $env:EASY_AUTH_CLIENT_ID) {
    Write-Output ''
    Write-Output 'Warning: ALLOWED_CLIENT_APP_IDS / ALLOWED_CLIENT_ROLES turn Entra ID sign-in on, but EASY_AUTH_CLIENT_ID is empty:'
    Write-Output '  no token can name this API as its audience, so every Entra ID caller is refused. Run'
    Write-Output '  azd env set EASY_AUTH_CLIENT_ID <client id of the API''s app registration>; azd provision'
}

if ($env:GRANT_GRAPH_PERMISSION -in @('sync', 'ownedby')) {
    Write-Output ''
    Write-Output "GRANT_GRAPH_PERMISSION=$($env:GRANT_GRAPH_PERMISSION): trying the grant now."
    try {
        $mode = if ($env:GRANT_GRAPH_PERMISSION -eq 'sync') { 'Sync' } else { 'OwnedBy' }
        & $script -PrincipalId $principal -Cloud $cloud -Mode $mode -TargetServicePrincipalId $env:DEFAULT_SERVICE_PRINCIPAL_ID
    }
    catch {
        Write-Output "The grant did not go through ($($_.Exception.Message)); run the command above as a Privileged Role Administrator."
    }
}
exit 0
