// The Function App on a Flex Consumption plan, running as the user-assigned identity for everything:
// the host's storage, the deployment package, Application Insights, Graph and log ingestion.
// siteConfig holds only what Flex Consumption supports, as in Microsoft's azd Flex quickstart: ARM
// rejects ftpsState on a Flex site (error 51021), and Flex documents no http20Enabled or cors
// (https://learn.microsoft.com/azure/azure-functions/functions-app-settings#flex-consumption-plan-deprecations).
param name string
param planName string
param location string
param tags object = {}

param identityId string

param storageBlobEndpoint string
param deploymentContainerName string

// Python versions Flex Consumption runs; Microsoft's azd Flex quickstart pins 3.12:
// https://learn.microsoft.com/azure/azure-functions/flex-consumption-plan#supported-language-stack-versions
@allowed(['3.12', '3.13'])
param pythonVersion string = '3.12'

// Flex Consumption's instance sizes (docs/deploy.md, "Cost", says why 512):
// https://learn.microsoft.com/azure/azure-functions/flex-consumption-plan#instance-sizes
@allowed([512, 2048, 4096])
param instanceMemoryMB int = 512

@minValue(1)
@maxValue(1000)
param maximumInstanceCount int = 10

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
    //checkov:skip=CKV_AZURE_78:Flex Consumption rejects siteConfig.ftpsState (ARM error 51021) and deploys only from its blob container: there is no FTP endpoint to turn off.
    //checkov:skip=CKV_AZURE_18:http20Enabled is not a Flex Consumption site property (Microsoft's azd Flex quickstart sets none), so the template leaves HTTP versions to the platform.
    siteConfig: {
      //checkov:skip=CKV_AZURE_67:Same as CKV_AZURE_18 for function apps: http20Enabled is not a Flex Consumption site property.
      minTlsVersion: '1.2'
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
