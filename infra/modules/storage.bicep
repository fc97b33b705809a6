// The app's only storage account: Functions host state, the deployment package, and every queue the
// pipeline uses. No keys: shared-key access is off, so a leaked connection string is worth nothing and
// every caller must be an Entra principal with a data role.
param name string
param location string
param tags object = {}

@description('Queues to create up front, so that nothing depends on the app creating them on first use.')
param queueNames array

@description('Blob containers the Functions host and Flex deployment use.')
param containerNames array

@description('Tables the app uses (request status).')
param tableNames array = []

// LRS by default: every Flex Consumption region offers it, ZRS only regions with zones
// (https://learn.microsoft.com/azure/storage/common/redundancy-regions-zrs). main.bicep passes
// storageSkuName (azd STORAGE_SKU).
@allowed(['Standard_LRS', 'Standard_ZRS'])
param skuName string = 'Standard_LRS'

resource storage 'Microsoft.Storage/storageAccounts@2023-05-01' = {
  name: name
  location: location
  tags: tags
  kind: 'StorageV2'
  //checkov:skip=CKV_AZURE_206:A geo replica adds nothing for transient work queues and host state whose only consumer is a single-region Function App; LRS is the default because every Flex region offers it, ZRS is a parameter (STORAGE_SKU).
  sku: {
    name: skuName
  }
  properties: {
    accessTier: 'Hot'
    allowSharedKeyAccess: false
    defaultToOAuthAuthentication: true
    allowBlobPublicAccess: false
    allowCrossTenantReplication: false
    isLocalUserEnabled: false
    isSftpEnabled: false
    isHnsEnabled: false
    minimumTlsVersion: 'TLS1_2'
    supportsHttpsTrafficOnly: true
    dnsEndpointType: 'Standard'
    // Flex Consumption without VNet integration reaches storage over its public endpoint; access is
    // still Entra-only (no shared key). docs/deploy.md describes the private-endpoint variant.
    //checkov:skip=CKV_AZURE_35:Flex Consumption without VNet integration needs the public endpoint; every request still needs an Entra token with a data role (shared key is disabled).
    //checkov:skip=CKV_AZURE_59:Same reason as CKV_AZURE_35: public network access is required without VNet integration; anonymous and key access are both disabled.
    publicNetworkAccess: 'Enabled'
    networkAcls: {
      defaultAction: 'Allow'
      bypass: 'AzureServices'
    }
    encryption: {
      keySource: 'Microsoft.Storage'
      requireInfrastructureEncryption: true
      services: {
        blob: { enabled: true, keyType: 'Account' }
        file: { enabled: true, keyType: 'Account' }
        queue: { enabled: true, keyType: 'Account' }
        table: { enabled: true, keyType: 'Account' }
      }
    }
  }
}

resource blobService 'Microsoft.Storage/storageAccounts/blobServices@2023-05-01' = {
  parent: storage
  name: 'default'
  properties: {
    deleteRetentionPolicy: {
      enabled: true
      days: 7
    }
    containerDeleteRetentionPolicy: {
      enabled: true
      days: 7
    }
  }
}

resource containers 'Microsoft.Storage/storageAccounts/blobServices/containers@2023-05-01' = [for container in containerNames: {
  parent: blobService
  name: container
  properties: {
    publicAccess: 'None'
  }
}]

resource queueService 'Microsoft.Storage/storageAccounts/queueServices@2023-05-01' = {
  parent: storage
  name: 'default'
}

resource queues 'Microsoft.Storage/storageAccounts/queueServices/queues@2023-05-01' = [for queue in queueNames: {
  parent: queueService
  name: queue
}]

resource tableService 'Microsoft.Storage/storageAccounts/tableServices@2023-05-01' = {
  parent: storage
  name: 'default'
}

resource tables 'Microsoft.Storage/storageAccounts/tableServices/tables@2023-05-01' = [for table in tableNames: {
  parent: tableService
  name: table
}]

output id string = storage.id
output name string = storage.name
output blobEndpoint string = storage.properties.primaryEndpoints.blob
output queueEndpoint string = storage.properties.primaryEndpoints.queue
output tableEndpoint string = storage.properties.primaryEndpoints.table
