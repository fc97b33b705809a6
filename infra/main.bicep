// `azd up` entry point: one resource group holding the Function App (Flex Consumption, Python), its
// user-assigned identity, a key-less storage account, monitoring and the results DCR.
// Every app setting the code reads is set here, in `appSettings` below (tests/test_infra.py checks it).
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

@description('Microsoft Graph national cloud of the tenant. The app must run in the same cloud as its identity.')
@allowed(['Global', 'USGovL4', 'USGovL5'])
param graphCloud string = 'Global'

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
param autoStartCooldownSeconds string = ''
@description('Share of the rate that high-priority requests may take while normal ones wait (0-0.95).')
param highPriorityShare string = ''
@description('Serve equal waiting requests with one Graph call.')
param coalesceRequests string = 'true'
@description('The table that holds request status (letters and digits).')
param statusTable string = 'provisionstatus'
@description('The table of Idempotency-Key answers and seen webhook signatures (letters and digits).')
param idempotencyTable string = 'provisionkeys'

@description('Start a quarantined job (never a paused one) when a call finds it so, at most once per cooldown.')
@allowed(['true', 'false'])
param autoStartQuarantinedJob string = 'false'

@allowed(['3.11', '3.12'])
param pythonVersion string = '3.11'

@minValue(1)
@maxValue(1000)
param maximumInstanceCount int = 40

@minValue(30)
@maxValue(730)
param logRetentionInDays int = 30

var tags = { 'azd-env-name': environmentName }
var token = toLower(uniqueString(subscription().id, environmentName, location))

var graphRoots = {
  Global: 'https://graph.microsoft.com'
  USGovL4: 'https://graph.microsoft.us'
  USGovL5: 'https://dod-graph.microsoft.us'
}

// Defaults of shared/settings.py; the queues are created here so that none depends on first use.
var queueNames = {
  intake: 'provision-requests'
  work: 'provision-work'
  results: 'provision-results'
  deadletter: 'provision-deadletter'
  lease: 'provision-leases'
  logs: 'provision-logs'
}
var allQueues = [
  queueNames.intake
  queueNames.work
  queueNames.results
  queueNames.deadletter
  queueNames.lease
  queueNames.logs
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
    queueNames: allQueues
    containerNames: containerNames
    tableNames: [statusTable, idempotencyTable]
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
    containerNames: containerNames
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
  AzureWebJobsFeatureFlags: 'EnableWorkerIndexing'
  APPLICATIONINSIGHTS_CONNECTION_STRING: monitoring.outputs.appInsightsConnectionString
  APPLICATIONINSIGHTS_AUTHENTICATION_STRING: 'ClientId=${identity.outputs.clientId};Authorization=AAD'
  AZURE_CLIENT_ID: identity.outputs.clientId

  GRAPH_CLOUD: graphCloud
  GRAPH_API_VERSION: graphApiVersion
  GRAPH_ENDPOINT: graphRoots[graphCloud]
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
  COALESCE_REQUESTS: coalesceRequests
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

  RULE_CACHE_SECONDS: ruleCacheSeconds
  AUTO_START_QUARANTINED_JOB: autoStartQuarantinedJob
  AUTO_START_COOLDOWN_SECONDS: autoStartCooldownSeconds

  WEBHOOK_HMAC_SECRET: webhookHmacSecret
  WEBHOOK_SIGNATURE_HEADER: webhookSignatureHeader
  WEBHOOK_TIMESTAMP_HEADER: webhookTimestampHeader
  WEBHOOK_TOLERANCE_SECONDS: webhookToleranceSeconds
  REDACT_PII: redactPii
  REDACT_PII_SALT: redactPiiSalt

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
    maximumInstanceCount: maximumInstanceCount
    appSettings: appSettings
  }
  // The host starts as soon as the site exists; without its roles it would fail its first storage calls.
  dependsOn: [rbac]
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
