// `azd up` entry point: one resource group holding the Function App (Flex Consumption, Python), its
// user-assigned identity, a key-less storage account, monitoring and the results DCR.
// Every app setting the code reads is set here, in `appSettings` below (tests/integration/test_infra.py
// checks it, and encodes each Flex Consumption rule this template follows).
//
// Azure public cloud only: Flex Consumption is not offered in Azure Government (docs/deploy.md,
// "Clouds"), and a managed identity gets tokens only from its own cloud, so the Graph root is the
// global one. docs/deploy.md says how to run the app in Azure Government.
targetScope = 'subscription'

@minLength(1)
@maxLength(64)
@description('azd environment name; part of every resource name.')
param environmentName string

@minLength(1)
@description('Azure region (one that offers Flex Consumption).')
@metadata({ azd: { type: 'location' } })
param location string

@description('Resource group name; empty = rg-<environmentName>.')
param resourceGroupName string = ''

@allowed(['v1.0', 'beta'])
param graphApiVersion string = 'v1.0'

@description('Object id of the enterprise application\'s service principal, for requests that name none.')
param defaultServicePrincipalId string = ''

@description('Synchronization job id, for requests that name none.')
param defaultJobId string = ''

@description('Synchronization rule id, for requests that name none.')
param defaultRuleId string = ''

@minValue(1)
@maxValue(32)
@description('Graph calls allowed per window (provisionOnDemand: 5 per 10 s).')
param rateLimitCalls int = 5

@minValue(1)
@maxValue(3600)
param rateLimitWindowSeconds int = 10

@description('One lease pool for the tenant, or one per service principal / job.')
@allowed(['tenant', 'servicePrincipal', 'job'])
param rateLimitScope string = 'tenant'

@description('Where results go: the results queue, Log Analytics through the DCR, or both.')
@allowed(['queue', 'loganalytics', 'both'])
param resultsSink string = 'both'

// Tunables: empty means the app's own default (shared/settings.py ignores empty settings), so the
// defaults live in one place; the settings still exist on the app for an operator to change.
param graphTimeoutSeconds string = ''
param rateLimitMarginSeconds string = ''
param scheduleLeadSeconds string = ''
param scheduleBatch string = ''
param maxSlotWaitSeconds string = ''
param maxAttempts string = ''
param retryBaseSeconds string = ''
param retryMaxSeconds string = ''
param maxExpectedWaitHours string = ''
param maxBodyBytes string = ''
param maxCallsPerPost string = ''
param idempotencyRetentionHours string = ''
param outOfScopeRetryMinutes string = ''
param webhookSignatureHeader string = ''
param webhookTimestampHeader string = ''
param webhookToleranceSeconds string = ''
param redactPii string = ''

// Secrets: @secure() keeps them out of deployment history and logs. Empty = feature off. azd takes
// them from its environment (`azd env set WEBHOOK_HMAC_SECRET ...`, see main.parameters.json), so a
// redeploy keeps them; a Key Vault reference (@Microsoft.KeyVault(SecretUri=...)) works as well.
@secure()
param webhookHmacSecret string = ''
@secure()
param redactPiiSalt string = ''
param logsMaxAttempts string = ''
param logsBatchSize string = ''
param logsTimeoutSeconds string = ''
param ruleCacheSeconds string = ''
param nameCacheSeconds string = ''
@description('Hosts results may be POSTed to (callbackUrl), comma-separated; empty turns callbacks off.')
param callbackAllowedHosts string = ''
param callbackMaxAttempts string = ''
param callbackTimeoutSeconds string = ''
param autoStartCooldownSeconds string = ''
@description('Share of the rate that high-priority requests may take while normal ones wait (0-0.95).')
param highPriorityShare string = ''
@description('Serve equal waiting requests with one Graph call.')
param coalesceRequests string = 'true'
@description('The HTTP door queues accepted requests for the queue door in one write (false: it admits them itself).')
param fastIntake string = 'true'
@description('The table that holds request status (letters and digits).')
param statusTable string = 'provisionstatus'
@description('Table where each result callback\'s state is kept (shared/results/callbacks.py).')
param callbackTable string = 'provisioncallbacks'
@description('The table of Idempotency-Key answers and seen webhook signatures (letters and digits).')
param idempotencyTable string = 'provisionkeys'

@description('Start a quarantined job (never a paused one) when a call finds it so, at most once per cooldown.')
@allowed(['true', 'false'])
param autoStartQuarantinedJob string = 'false'

@description('Python on Flex Consumption: 3.12 as in Microsoft\'s azd Flex quickstart, or 3.13.')
@allowed(['3.12', '3.13'])
param pythonVersion string = '3.12'

@description('Flex Consumption instance memory (MB); docs/deploy.md, "Cost", says why 512.')
@allowed([512, 2048, 4096])
param instanceMemoryMB int = 512

@description('Most instances Flex Consumption may run; sized for Graph\'s 0.5 calls/s in docs/deploy.md, "Cost".')
@minValue(1)
@maxValue(1000)
param maximumInstanceCount int = 10

// Standard_LRS is offered in every Flex Consumption region; ZRS is not (westus, westcentralus,
// northcentralus, ukwest, southindia, australiasoutheast):
// https://learn.microsoft.com/azure/storage/common/redundancy-regions-zrs
@description('Storage redundancy: Standard_LRS works in every Flex region; Standard_ZRS where the region has zones.')
@allowed(['Standard_LRS', 'Standard_ZRS'])
param storageSkuName string = 'Standard_LRS'

// App Service Authentication (Easy Auth) with Microsoft Entra ID, off unless callers are named.
@description('Client (application) ids allowed to call with an Entra ID token, comma-separated; empty = none by id.')
param allowedClientAppIds string = ''
@description('App roles a caller\'s token must hold one of, comma-separated; empty = no role needed.')
param allowedClientRoles string = ''
@description('Client id of the Entra app registration that represents this API (the tokens\' audience).')
param easyAuthClientId string = ''

@minValue(30)
@maxValue(730)
param logRetentionInDays int = 30

var tags = { 'azd-env-name': environmentName }
var token = toLower(uniqueString(subscription().id, environmentName, location))

var graphCloud = 'Global'
var easyAuthEnabled = !(empty(allowedClientAppIds) && empty(allowedClientRoles))
var allowedApplications = empty(allowedClientAppIds) ? [] : split(replace(allowedClientAppIds, ' ', ''), ',')

// Defaults of shared/settings.py; the queues are created here so that none depends on first use.
var queueNames = {
  intake: 'provision-requests'
  work: 'provision-work'
  results: 'provision-results'
  deadletter: 'provision-deadletter'
  lease: 'provision-leases'
  logs: 'provision-logs'
  callbacks: 'provision-callbacks'
}
var allQueues = [
  queueNames.intake
  queueNames.work
  queueNames.results
  queueNames.deadletter
  queueNames.lease
  queueNames.logs
  queueNames.callbacks
]
var deploymentContainerName = 'app-package'
var containerNames = [
  deploymentContainerName
  'azure-webjobs-hosts'
  'azure-webjobs-secrets'
]

resource rg 'Microsoft.Resources/resourceGroups@2024-03-01' = {
  name: !empty(resourceGroupName) ? resourceGroupName : 'rg-${environmentName}'
  location: location
  tags: tags
}

module identity 'modules/identity.bicep' = {
  name: 'identity'
  scope: rg
  params: {
    name: 'id-${token}'
    location: location
    tags: tags
  }
}

module storage 'modules/storage.bicep' = {
  name: 'storage'
  scope: rg
  params: {
    name: 'st${token}'
    location: location
    tags: tags
    skuName: storageSkuName
    queueNames: allQueues
    containerNames: containerNames
    tableNames: [statusTable, callbackTable, idempotencyTable]
  }
}

module monitoring 'modules/monitoring.bicep' = {
  name: 'monitoring'
  scope: rg
  params: {
    workspaceName: 'log-${token}'
    appInsightsName: 'appi-${token}'
    dcrName: 'dcr-results-${token}'
    location: location
    tags: tags
    retentionInDays: logRetentionInDays
  }
}

module rbac 'modules/rbac.bicep' = {
  name: 'rbac'
  scope: rg
  params: {
    principalId: identity.outputs.principalId
    storageAccountName: storage.outputs.name
    dcrName: monitoring.outputs.dcrName
    appInsightsName: monitoring.outputs.appInsightsName
  }
}

var appSettings = {
  // Identity-based host storage: no AzureWebJobsStorage connection string exists (shared key is off).
  // Service URIs rather than accountName, so national clouds get their own endpoint suffixes.
  AzureWebJobsStorage__credential: 'managedidentity'
  AzureWebJobsStorage__clientId: identity.outputs.clientId
  AzureWebJobsStorage__blobServiceUri: storage.outputs.blobEndpoint
  AzureWebJobsStorage__queueServiceUri: storage.outputs.queueEndpoint
  AzureWebJobsStorage__tableServiceUri: storage.outputs.tableEndpoint
  APPLICATIONINSIGHTS_CONNECTION_STRING: monitoring.outputs.appInsightsConnectionString
  APPLICATIONINSIGHTS_AUTHENTICATION_STRING: 'ClientId=${identity.outputs.clientId};Authorization=AAD'
  AZURE_CLIENT_ID: identity.outputs.clientId
  // The functions are synchronous and wait on storage and Graph most of the time: the worker's
  // default pool (min(32, cores + 4) threads) leaves HTTP requests queued behind waiting queue
  // invocations; 32 is the most the worker allows
  // (https://learn.microsoft.com/en-us/azure/azure-functions/python-scale-performance-reference).
  PYTHON_THREADPOOL_THREAD_COUNT: '32'

  GRAPH_CLOUD: graphCloud
  GRAPH_API_VERSION: graphApiVersion
  GRAPH_ENDPOINT: 'https://graph.microsoft.com'
  GRAPH_TIMEOUT_SECONDS: graphTimeoutSeconds

  DEFAULT_SERVICE_PRINCIPAL_ID: defaultServicePrincipalId
  DEFAULT_JOB_ID: defaultJobId
  DEFAULT_RULE_ID: defaultRuleId

  INTAKE_QUEUE: queueNames.intake
  WORK_QUEUE: queueNames.work
  RESULTS_QUEUE: queueNames.results
  DEADLETTER_QUEUE: queueNames.deadletter
  LEASE_QUEUE: queueNames.lease
  STATUS_TABLE: statusTable
  CALLBACK_QUEUE: queueNames.callbacks
  CALLBACK_TABLE: callbackTable
  COALESCE_REQUESTS: coalesceRequests
  FAST_INTAKE: fastIntake
  IDEMPOTENCY_TABLE: idempotencyTable
  IDEMPOTENCY_RETENTION_HOURS: idempotencyRetentionHours
  HIGH_PRIORITY_SHARE: highPriorityShare

  RATE_LIMIT_CALLS: string(rateLimitCalls)
  RATE_LIMIT_WINDOW_SECONDS: string(rateLimitWindowSeconds)
  RATE_LIMIT_MARGIN_SECONDS: rateLimitMarginSeconds
  RATE_LIMIT_SCOPE: rateLimitScope
  SCHEDULE_LEAD_SECONDS: scheduleLeadSeconds
  SCHEDULE_BATCH: scheduleBatch
  MAX_SLOT_WAIT_SECONDS: maxSlotWaitSeconds

  MAX_ATTEMPTS: maxAttempts
  RETRY_BASE_SECONDS: retryBaseSeconds
  RETRY_MAX_SECONDS: retryMaxSeconds
  MAX_EXPECTED_WAIT_HOURS: maxExpectedWaitHours
  MAX_BODY_BYTES: maxBodyBytes
  MAX_CALLS_PER_POST: maxCallsPerPost
  OUT_OF_SCOPE_RETRY_MINUTES: outOfScopeRetryMinutes

  RULE_CACHE_SECONDS: ruleCacheSeconds
  NAME_CACHE_SECONDS: nameCacheSeconds
  AUTO_START_QUARANTINED_JOB: autoStartQuarantinedJob
  AUTO_START_COOLDOWN_SECONDS: autoStartCooldownSeconds

  WEBHOOK_HMAC_SECRET: webhookHmacSecret
  WEBHOOK_SIGNATURE_HEADER: webhookSignatureHeader
  WEBHOOK_TIMESTAMP_HEADER: webhookTimestampHeader
  WEBHOOK_TOLERANCE_SECONDS: webhookToleranceSeconds
  REDACT_PII: redactPii
  REDACT_PII_SALT: redactPiiSalt

  // The app reads the caller from X-MS-CLIENT-PRINCIPAL and admits these when Easy Auth is on.
  EASY_AUTH_ENABLED: easyAuthEnabled ? 'true' : 'false'
  ALLOWED_CLIENT_APP_IDS: allowedClientAppIds
  ALLOWED_CLIENT_ROLES: allowedClientRoles
  CALLBACK_ALLOWED_HOSTS: callbackAllowedHosts
  // Loopback receivers are for local development only.
  CALLBACK_ALLOW_LOOPBACK: 'false'
  CALLBACK_MAX_ATTEMPTS: callbackMaxAttempts
  CALLBACK_TIMEOUT_SECONDS: callbackTimeoutSeconds

  RESULTS_SINK: resultsSink
  LOGS_INGESTION_ENDPOINT: monitoring.outputs.logsIngestionEndpoint
  LOGS_DCR_IMMUTABLE_ID: monitoring.outputs.dcrImmutableId
  LOGS_STREAM_NAME: monitoring.outputs.streamName
  LOGS_QUEUE: queueNames.logs
  LOGS_MAX_ATTEMPTS: logsMaxAttempts
  LOGS_BATCH_SIZE: logsBatchSize
  LOGS_TIMEOUT_SECONDS: logsTimeoutSeconds
}

module functionApp 'modules/functionapp.bicep' = {
  name: 'functionapp'
  scope: rg
  params: {
    name: 'func-${token}'
    planName: 'plan-${token}'
    location: location
    tags: tags
    identityId: identity.outputs.id
    storageBlobEndpoint: storage.outputs.blobEndpoint
    deploymentContainerName: deploymentContainerName
    pythonVersion: pythonVersion
    instanceMemoryMB: instanceMemoryMB
    maximumInstanceCount: maximumInstanceCount
    appSettings: appSettings
  }
  // The host starts as soon as the site exists; without its roles it would fail its first storage calls.
  dependsOn: [rbac]
}

module easyAuth 'modules/easyauth.bicep' = if (easyAuthEnabled) {
  name: 'easyauth'
  scope: rg
  params: {
    siteName: functionApp.outputs.name
    clientId: easyAuthClientId
    issuer: '${environment().authentication.loginEndpoint}${tenant().tenantId}/v2.0'
    audiences: ['api://${easyAuthClientId}', easyAuthClientId]
    allowedApplications: allowedApplications
  }
}

output AZURE_LOCATION string = location
output AZURE_TENANT_ID string = tenant().tenantId
output AZURE_RESOURCE_GROUP string = rg.name
output AZURE_FUNCTION_APP_NAME string = functionApp.outputs.name
output AZURE_FUNCTION_URL string = 'https://${functionApp.outputs.defaultHostName}'
output APP_IDENTITY_PRINCIPAL_ID string = identity.outputs.principalId
output APP_IDENTITY_CLIENT_ID string = identity.outputs.clientId
output GRAPH_CLOUD string = graphCloud
output DEFAULT_SERVICE_PRINCIPAL_ID string = defaultServicePrincipalId
output LOGS_INGESTION_ENDPOINT string = monitoring.outputs.logsIngestionEndpoint
output LOGS_DCR_IMMUTABLE_ID string = monitoring.outputs.dcrImmutableId
output EASY_AUTH_ENABLED bool = easyAuthEnabled
