<#
.SYNOPSIS
Grant the app's managed identity the Microsoft Graph application permission that provisionOnDemand
needs, with the Microsoft.Graph PowerShell module. Idempotent: what exists is skipped.

.DESCRIPTION
-Mode Sync     Synchronization.ReadWrite.All (default): works for every enterprise app in the tenant,
               and job restarts work with it.
-Mode OwnedBy  Application.ReadWrite.OwnedBy plus ownership of -TargetServicePrincipalId: least
               privilege, limited to that app; restarting a job was reported to fail with it
               (microsoft-graph-docs-contrib issue 8800). See docs/deploy.md.

Run as a Privileged Role Administrator (app role grants); -Mode OwnedBy also needs the right to
manage the target service principal's owners. Supports -WhatIf. Defaults come from the azd
environment's outputs (APP_IDENTITY_PRINCIPAL_ID, DEFAULT_SERVICE_PRINCIPAL_ID, GRAPH_CLOUD) when set.

.EXAMPLE
./grant-graph-permission.ps1 -PrincipalId 11111111-2222-3333-4444-555555555555
./grant-graph-permission.ps1 -PrincipalId <id> -Mode OwnedBy -TargetServicePrincipalId <sp id> -WhatIf
#>
[CmdletBinding(SupportsShouldProcess = $true)]
param(
    [string] $PrincipalId = $env:APP_IDENTITY_PRINCIPAL_ID,

    [ValidateSet('Sync', 'OwnedBy')]
    [string] $Mode = 'Sync',

    [string] $TargetServicePrincipalId = $env:DEFAULT_SERVICE_PRINCIPAL_ID,

    [ValidateSet('Global', 'USGovL4', 'USGovL5')]
    [string] $Cloud = $(if ($env:GRAPH_CLOUD) { $env:GRAPH_CLOUD } else { 'Global' })
)

Set-StrictMode -Version Latest
$ErrorActionPreference = 'Stop'

$guid = '^[0-9a-fA-F]{8}-([0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}$'
if (-not $PrincipalId -or $PrincipalId -notmatch $guid) {
    throw "-PrincipalId must be the object id (GUID) of the app's managed identity (azd output APP_IDENTITY_PRINCIPAL_ID)."
}
if ($Cloud -notin @('Global', 'USGovL4', 'USGovL5')) {
    throw "-Cloud must be Global, USGovL4 or USGovL5 (provisionOnDemand is not offered in China)."
}
if ($Mode -eq 'OwnedBy' -and ($TargetServicePrincipalId -notmatch $guid)) {
    throw "-Mode OwnedBy needs -TargetServicePrincipalId: the object id of the enterprise app's service principal."
}

$graphAppId = '00000003-0000-0000-c000-000000000000'
$role = if ($Mode -eq 'Sync') { 'Synchronization.ReadWrite.All' } else { 'Application.ReadWrite.OwnedBy' }
$environment = @{ Global = 'Global'; USGovL4 = 'USGov'; USGovL5 = 'USGovDoD' }[$Cloud]
$graphRoot = @{ Global = 'https://graph.microsoft.com'; USGovL4 = 'https://graph.microsoft.us'; USGovL5 = 'https://dod-graph.microsoft.us' }[$Cloud]

Import-Module Microsoft.Graph.Applications -ErrorAction Stop
# Delegated scopes of the person running this, not of the identity being granted.
$scopes = @('AppRoleAssignment.ReadWrite.All', 'Application.Read.All')
if ($Mode -eq 'OwnedBy') { $scopes += 'Application.ReadWrite.All' }
Connect-MgGraph -Environment $environment -Scopes $scopes -NoWelcome

$graphSp = Get-MgServicePrincipal -Filter "appId eq '$graphAppId'" -Property Id, AppRoles
$appRole = $graphSp.AppRoles | Where-Object { $_.Value -eq $role -and $_.AllowedMemberTypes -contains 'Application' }
if (-not $appRole) { throw "Microsoft Graph's app role $role was not found in this tenant." }

$existing = Get-MgServicePrincipalAppRoleAssignment -ServicePrincipalId $PrincipalId -All |
    Where-Object { $_.AppRoleId -eq $appRole.Id -and $_.ResourceId -eq $graphSp.Id }
if ($existing) {
    Write-Output "Skipped: $PrincipalId already has Microsoft Graph $role."
}
elseif ($PSCmdlet.ShouldProcess($PrincipalId, "Grant Microsoft Graph $role")) {
    # Posted to the resource's appRoleAssignedTo, as Graph's grant-an-app-role guide does:
    # https://learn.microsoft.com/graph/api/serviceprincipal-post-approleassignedto
    New-MgServicePrincipalAppRoleAssignedTo -ServicePrincipalId $graphSp.Id -PrincipalId $PrincipalId `
        -ResourceId $graphSp.Id -AppRoleId $appRole.Id | Out-Null
    Write-Output "Granted: Microsoft Graph $role to $PrincipalId."
}

if ($Mode -eq 'OwnedBy') {
    # OwnedBy covers only what the identity owns: the enterprise app's service principal itself.
    $owners = Get-MgServicePrincipalOwner -ServicePrincipalId $TargetServicePrincipalId -All
    if ($owners | Where-Object { $_.Id -eq $PrincipalId }) {
        Write-Output "Skipped: $PrincipalId already owns service principal $TargetServicePrincipalId."
    }
    elseif ($PSCmdlet.ShouldProcess($TargetServicePrincipalId, "Add $PrincipalId as owner")) {
        New-MgServicePrincipalOwnerByRef -ServicePrincipalId $TargetServicePrincipalId `
            -BodyParameter @{ '@odata.id' = "$graphRoot/v1.0/directoryObjects/$PrincipalId" }
        Write-Output "Added: $PrincipalId as an owner of service principal $TargetServicePrincipalId."
    }
}

Write-Output 'Managed identity tokens are cached for up to 24 hours: restart the Function App so that new tokens carry the role,'
Write-Output 'then run the preflight: GET /api/health/deep (function key) or python -m shared.preflight.'
