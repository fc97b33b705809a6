// The Function App on a Flex Consumption plan, running as the user-assigned identity for everything:
// the host's storage, the deployment package, Application Insights, Graph and log ingestion.
param name string
param planName string
param location string
param tags object = {}

param identityId string

param storageBlobEndpoint string
param deploymentContainerName string

@allowed(['3.11', '3.12'])
param pythonVersion string = '3.11'

@allowed([512, 2048, 4096])
param instanceMemoryMB int = 2048

@minValue(1)
@maxValue(1000)
param maximumInstanceCount int = 40

@description('App settings; the module adds nothing of its own, so main.bicep is the one list to read.')
@secure() // it carries WEBHOOK_HMAC_SECRET and REDACT_PII_SALT: keep them out of deployment history
param appSettings object

resource plan 'Microsoft.Web/serverfarms@2024-04-01' = {
  name: planName
  location: location
  tags: tags
  kind: 'functionapp'
  sku: {
    name: 'FC1'
    tier: 'FlexConsumption'
  }
  properties: {
    reserved: true
    //checkov:skip=CKV_AZURE_225:Zone redundancy on Flex Consumption is a plan option with its own region availability and cost; left to the operator (docs/deploy.md).
  }
}

resource site 'Microsoft.Web/sites@2024-04-01' = {
  name: name
  location: location
  // azd finds the app to deploy `services.api` into by this tag.
  tags: union(tags, { 'azd-service-name': 'api' })
  kind: 'functionapp,linux'
  identity: {
    type: 'UserAssigned'
    userAssignedIdentities: {
      '${identityId}': {}
    }
  }
  properties: {
    serverFarmId: plan.id
    httpsOnly: true
    //checkov:skip=CKV_AZURE_17:Callers authenticate with function keys (and the intake queue); requiring client certificates would break the documented callers (Logic Apps, HR systems).
    clientCertEnabled: false
    //checkov:skip=CKV_AZURE_222:The provision endpoint is called from outside Azure (HR systems, Logic Apps); it is protected by function keys. A private endpoint variant is described in docs/deploy.md.
    publicNetworkAccess: 'Enabled'
    //checkov:skip=CKV_AZURE_212:Flex Consumption scales instances on demand (no fixed instance count to set a failover minimum on).
    //checkov:skip=CKV_AZURE_213:App Service health-check instance eviction does not apply to Flex Consumption; GET /api/health is there for external availability tests.
    siteConfig: {
      minTlsVersion: '1.2'
      ftpsState: 'Disabled'
      http20Enabled: true
      cors: {
        allowedOrigins: []
      }
      appSettings: [for setting in items(appSettings): {
        name: setting.key
        value: setting.value
      }]
    }
    functionAppConfig: {
      deployment: {
        storage: {
          type: 'blobContainer'
          value: '${storageBlobEndpoint}${deploymentContainerName}'
          authentication: {
            type: 'UserAssignedIdentity'
            userAssignedIdentityResourceId: identityId
          }
        }
      }
      scaleAndConcurrency: {
        instanceMemoryMB: instanceMemoryMB
        maximumInstanceCount: maximumInstanceCount
      }
      // Flex takes the language from here; FUNCTIONS_WORKER_RUNTIME is not an allowed app setting.
      runtime: {
        name: 'python'
        version: pythonVersion
      }
    }
  }
}

output name string = site.name
output id string = site.id
output defaultHostName string = site.properties.defaultHostName
