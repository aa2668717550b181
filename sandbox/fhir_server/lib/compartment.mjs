// The patient compartment: which resources a patient-level token may see and write.

// Reference elements that put a resource in a patient's compartment (a subset of the R4 CompartmentDefinition).
const PATIENT_REFERENCE_ELEMENTS = {
  AllergyIntolerance: ['patient', 'recorder', 'asserter'],
  CarePlan: ['subject'],
  Communication: ['subject', 'recipient'],
  Condition: ['subject', 'asserter'],
  DiagnosticReport: ['subject'],
  DocumentReference: ['subject', 'author'],
  Encounter: ['subject'],
  Immunization: ['patient'],
  MedicationRequest: ['subject'],
  MedicationStatement: ['subject'],
  Observation: ['subject', 'performer'],
  Procedure: ['subject'],
  QuestionnaireResponse: ['subject', 'author', 'source'],
  ServiceRequest: ['subject'],
};

/** Types a patient token is limited on; other types (Practitioner, Organization, Device, Binary…) are not patient data. */
export function isPatientCompartmentType(resourceType) {
  return resourceType === 'Patient' || resourceType === 'Provenance' || resourceType in PATIENT_REFERENCE_ELEMENTS;
}

function referencesOf(value) {
  const list = Array.isArray(value) ? value : [value];
  return list.map((item) => item?.reference).filter((reference) => typeof reference === 'string');
}

/**
 * Whether `resource` belongs to Patient/`patientId`'s compartment.
 * A Provenance belongs when one of its targets does (so a document's Provenance can be written with a patient token);
 * `lookup(reference)` returns the stored resource for "Type/id" or undefined.
 */
export function inPatientCompartment(resource, patientId, lookup) {
  const patientReference = `Patient/${patientId}`;
  if (resource.resourceType === 'Patient') {
    return resource.id === patientId;
  }
  if (resource.resourceType === 'Provenance') {
    return referencesOf(resource.target).some((reference) => {
      if (reference === patientReference) return true;
      const target = lookup(reference);
      return Boolean(target) && target.resourceType !== 'Provenance' && inPatientCompartment(target, patientId, lookup);
    });
  }
  const elements = PATIENT_REFERENCE_ELEMENTS[resource.resourceType];
  if (!elements) {
    return true;
  }
  return elements.some((element) => referencesOf(resource[element]).includes(patientReference));
}
