// The one identity the app runs as: storage, Graph and log ingestion all see this principal, so a
// user-assigned identity lets the Graph grant survive the Function App being deleted and recreated.
param name string
param location string
param tags object = {}

resource identity 'Microsoft.ManagedIdentity/userAssignedIdentities@2023-01-31' = {
  name: name
  location: location
  tags: tags
}

output id string = identity.id
output name string = identity.name
output clientId string = identity.properties.clientId
output principalId string = identity.properties.principalId
