// The CapabilityStatement, which reflects the active profile (transactions offered, attachment rules).
import { MAX_INLINE_ATTACHMENT_BYTES, offersTransactions, PDF_ONLY_CONTENT_TYPES } from './profiles.mjs';

const EXTENSION_BASE = 'https://carecanvas.invalid/fhir/StructureDefinition';
export const ACCEPTED_CONTENT_TYPE_EXTENSION = `${EXTENSION_BASE}/accepted-attachment-content-type`;
export const MAX_INLINE_BYTES_EXTENSION = `${EXTENSION_BASE}/max-inline-attachment-bytes`;

const RESOURCE_TYPES = [
  'Patient',
  'Practitioner',
  'PractitionerRole',
  'Organization',
  'Encounter',
  'Condition',
  'QuestionnaireResponse',
  'DocumentReference',
  'Binary',
  'Device',
  'Provenance',
  'AuditEvent',
  'Communication',
];
// A document-only EHR (pdf-only) records no Communications, so "give to patient" has nothing to write to.
const DOCUMENT_ONLY_OMITS = new Set(['Communication']);

const SEARCH_PARAMS = {
  Condition: [['patient', 'reference'], ['subject', 'reference'], ['clinical-status', 'token'], ['category', 'token'], ['identifier', 'token']],
  DocumentReference: [['patient', 'reference'], ['subject', 'reference'], ['identifier', 'token'], ['status', 'token'], ['category', 'token']],
  Encounter: [['patient', 'reference'], ['subject', 'reference']],
  QuestionnaireResponse: [['patient', 'reference'], ['subject', 'reference'], ['identifier', 'token']],
  Provenance: [['target', 'reference'], ['patient', 'reference']],
  Device: [['identifier', 'token']],
  Patient: [['identifier', 'token']],
  PractitionerRole: [['practitioner', 'reference'], ['organization', 'reference'], ['active', 'token']],
  Communication: [['patient', 'reference'], ['subject', 'reference'], ['identifier', 'token']],
};

function attachmentExtensions(profile) {
  const extensions = [];
  if (profile === 'pdf-only') {
    for (const contentType of PDF_ONLY_CONTENT_TYPES) {
      extensions.push({ url: ACCEPTED_CONTENT_TYPE_EXTENSION, valueCode: contentType });
    }
  } else {
    extensions.push({ url: ACCEPTED_CONTENT_TYPE_EXTENSION, valueCode: '*/*' });
  }
  if (profile === 'small-inline') {
    extensions.push({ url: MAX_INLINE_BYTES_EXTENSION, valueInteger: MAX_INLINE_ATTACHMENT_BYTES });
  }
  return extensions;
}

function documentation(profile) {
  const parts = [`Sandbox EHR FHIR server, profile "${profile}".`];
  if (!offersTransactions(profile)) parts.push('Transaction Bundles are not supported: send ordered single requests.');
  if (profile === 'pdf-only') parts.push(`DocumentReference attachments must be one of ${PDF_ONLY_CONTENT_TYPES.join(', ')}.`);
  if (profile === 'small-inline') {
    parts.push(`Inline attachment data is limited to ${MAX_INLINE_ATTACHMENT_BYTES} bytes; larger content goes in a Binary.`);
  }
  return parts.join(' ');
}

export function capabilityStatement({ baseUrl, profile, smartConfig }) {
  const security = {
    cors: false,
    service: [
      { coding: [{ system: 'http://terminology.hl7.org/CodeSystem/restful-security-service', code: 'SMART-on-FHIR' }] },
    ],
    description: 'Bearer access tokens (RS256 JWT) from the sandbox SMART authorization server; v1 and v2 scopes.',
  };
  if (smartConfig?.authorization_endpoint && smartConfig?.token_endpoint) {
    security.extension = [
      {
        url: 'http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris',
        extension: [
          { url: 'authorize', valueUri: smartConfig.authorization_endpoint },
          { url: 'token', valueUri: smartConfig.token_endpoint },
        ],
      },
    ];
  }
  const interaction = [{ code: 'batch' }];
  if (offersTransactions(profile)) interaction.unshift({ code: 'transaction' });
  return {
    resourceType: 'CapabilityStatement',
    status: 'active',
    date: '2026-01-01',
    kind: 'instance',
    software: { name: 'CareCanvas sandbox FHIR server (Medplum fhir-router)', version: '0.1.0' },
    implementation: { description: `CareCanvas sandbox EHR (profile ${profile})`, url: baseUrl },
    fhirVersion: '4.0.1',
    format: ['json'],
    rest: [
      {
        mode: 'server',
        documentation: documentation(profile),
        security,
        resource: RESOURCE_TYPES.filter((type) => profile !== 'pdf-only' || !DOCUMENT_ONLY_OMITS.has(type)).map((type) => ({
          ...(type === 'DocumentReference' ? { extension: attachmentExtensions(profile) } : {}),
          type,
          interaction: [{ code: 'read' }, { code: 'search-type' }, { code: 'create' }, { code: 'update' }],
          updateCreate: true,
          conditionalCreate: true,
          searchParam: (SEARCH_PARAMS[type] ?? []).concat([['_id', 'token']]).map(([name, kind]) => ({ name, type: kind })),
        })),
        interaction,
      },
    ],
  };
}
