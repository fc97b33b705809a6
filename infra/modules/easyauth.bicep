// App Service Authentication (Easy Auth) with Microsoft Entra ID in front of the Function App, deployed
// only when azd names the callers (ALLOWED_CLIENT_APP_IDS / ALLOWED_CLIENT_ROLES). Tokens are
// validated by the platform (issuer, audience, allowed client applications); requests without a
// token are let through (AllowAnonymous) so that function keys and HMAC signatures keep working for
// callers without Entra ID, and the app admits an Entra caller by the X-MS-CLIENT-PRINCIPAL header
// the platform adds and external requests cannot set (docs/deploy.md, "Entra ID callers"):
// https://learn.microsoft.com/azure/app-service/overview-authentication-authorization#authorization-behavior
// https://learn.microsoft.com/azure/app-service/configure-authentication-user-identities
param siteName string

@description('Client id of the Entra app registration that represents this API.')
param clientId string

@description('The tenant\'s OpenID issuer (login endpoint of the cloud, tenant id, v2.0).')
param issuer string

@description('Audiences a token may carry: the Application ID URI (v1 tokens) and the client id (v2).')
param audiences array

@description('Client application ids a token may come from; empty admits any application of the tenant.')
param allowedApplications array = []

resource site 'Microsoft.Web/sites@2024-04-01' existing = {
  name: siteName

  resource auth 'config' = {
    name: 'authsettingsV2'
    //checkov:skip=CKV_AZURE_13:This resource is the App Service Authentication setting itself (authsettingsV2); the check only knows the retired authsettings name.
    //checkov:skip=CKV_AZURE_88:checkov runs its site-configuration checks on every Microsoft.Web/sites/config resource; this one is authsettingsV2, which holds no storage mounts; Flex Consumption mounts no Azure Files content share.
    properties: {
      //checkov:skip=CKV_AZURE_63:checkov runs its site-configuration checks on every Microsoft.Web/sites/config resource; this one is authsettingsV2, which has no HTTP logging property; the host logs to Application Insights.
      //checkov:skip=CKV_AZURE_65:checkov runs its site-configuration checks on every Microsoft.Web/sites/config resource; this one is authsettingsV2, which has no detailed-error property; errors are JSON bodies from the app.
      platform: {
        enabled: true
      }
      //checkov:skip=CKV_AZURE_66:checkov runs its site-configuration checks on every Microsoft.Web/sites/config resource; this one is authsettingsV2, which has no failed-request-tracing property; the host traces to Application Insights.
      //checkov:skip=CKV_AZURE_80:checkov runs its site-configuration checks on every Microsoft.Web/sites/config resource; this one is authsettingsV2, which has no .NET Framework version; the app is Python on Flex Consumption.
      globalValidation: {
        requireAuthentication: false
        unauthenticatedClientAction: 'AllowAnonymous'
      }
      identityProviders: {
        azureActiveDirectory: {
          enabled: true
          registration: {
            clientId: clientId
            openIdIssuer: issuer
          }
          validation: {
            allowedAudiences: audiences
            defaultAuthorizationPolicy: {
              allowedApplications: empty(allowedApplications) ? null : allowedApplications
            }
          }
        }
      }
      //checkov:skip=CKV_AZURE_222:checkov runs its site-configuration checks on every Microsoft.Web/sites/config resource; this one is authsettingsV2, which has no network setting; public access is decided on the site (see functionapp.bicep).
      login: {
        tokenStore: {
          enabled: false
        }
      }
    }
  }
}
