// Where the app's telemetry and its provisioning results land: one Log Analytics workspace behind
// Application Insights, plus the custom results table and the data collection rule (DCR) that the
// Logs Ingestion API writes through. The HTTP Data Collector API is retired, hence a DCR.
param workspaceName string
param appInsightsName string
param dcrName string
param location string
param tags object = {}

@minValue(30)
@maxValue(730)
param retentionInDays int = 30

// The table schema and the DCR come from infra/loganalytics/ (shared with shared/log_analytics.py
// and its tests), so the columns are written down once. Only the location and the workspace id,
// placeholders there, are filled in here.
var tableDefinition = loadJsonContent('../loganalytics/table.json')
var dcrDefinition = loadJsonContent('../loganalytics/dcr.json')
// The stream the app posts rows to (LOGS_STREAM_NAME).
var streamName = dcrDefinition.properties.dataFlows[0].streams[0]

resource workspace 'Microsoft.OperationalInsights/workspaces@2023-09-01' = {
  name: workspaceName
  location: location
  tags: tags
  properties: {
    sku: {
      name: 'PerGB2018'
    }
    retentionInDays: retentionInDays
    features: {
      // Only Entra-authenticated callers (our identity through the DCR) may write.
      disableLocalAuth: true
    }
  }
}

resource resultsTable 'Microsoft.OperationalInsights/workspaces/tables@2022-10-01' = {
  parent: workspace
  name: tableDefinition.name
  properties: {
    plan: tableDefinition.properties.plan
    retentionInDays: tableDefinition.properties.retentionInDays
    schema: tableDefinition.properties.schema
  }
}

// kind 'Direct' (from dcr.json) gives the DCR its own logs ingestion endpoint: no separate data
// collection endpoint resource is needed.
resource dcr 'Microsoft.Insights/dataCollectionRules@2023-03-11' = {
  name: dcrName
  location: location
  tags: tags
  kind: dcrDefinition.kind
  properties: {
    description: dcrDefinition.properties.description
    streamDeclarations: dcrDefinition.properties.streamDeclarations
    destinations: {
      logAnalytics: [
        {
          name: dcrDefinition.properties.destinations.logAnalytics[0].name
          workspaceResourceId: workspace.id
        }
      ]
    }
    // The output stream named after the table resource, as well as dependsOn: ARM fails a DCR whose
    // output table it cannot see yet (InvalidOutputTable), so the DCR must wait for the table.
    dataFlows: [for flow in dcrDefinition.properties.dataFlows: union(flow, { outputStream: 'Custom-${resultsTable.name}' })]
  }
  dependsOn: [resultsTable]
}

resource appInsights 'Microsoft.Insights/components@2020-02-02' = {
  name: appInsightsName
  location: location
  tags: tags
  kind: 'web'
  properties: {
    Application_Type: 'web'
    WorkspaceResourceId: workspace.id
    // Telemetry is sent with the app's identity (APPLICATIONINSIGHTS_AUTHENTICATION_STRING), so the
    // instrumentation key in the connection string alone cannot be used to write fake telemetry.
    DisableLocalAuth: true
    publicNetworkAccessForIngestion: 'Enabled'
    publicNetworkAccessForQuery: 'Enabled'
  }
}

output workspaceId string = workspace.id
output appInsightsId string = appInsights.id
output appInsightsName string = appInsights.name
output appInsightsConnectionString string = appInsights.properties.ConnectionString
output dcrId string = dcr.id
output dcrName string = dcr.name
output dcrImmutableId string = dcr.properties.immutableId
output logsIngestionEndpoint string = dcr.properties.endpoints.logsIngestion
output streamName string = streamName
