// SMART scopes (v1 `patient/Condition.read`, v2 `patient/Condition.rs`) and the access decision for one interaction.
import { HttpError } from './outcomes.mjs';

const V1_PERMISSIONS = { read: 'rs', write: 'cud', '*': 'cruds' };
const V2_PERMISSIONS = /^c?r?u?d?s?$/;
const SCOPE = /^(patient|user|system)\/([A-Za-z]+|\*)\.([A-Za-z*]+)$/;

/** Parses the `scope` claim into grants; scopes that are not resource scopes (openid, launch, …) grant nothing. */
export function parseScopes(scopeClaim) {
  const grants = [];
  for (const scope of String(scopeClaim ?? '').split(/\s+/).filter(Boolean)) {
    // v2 scopes narrowed by a query (`.rs?category=…`) are not honoured: granting them unnarrowed would over-share.
    const match = SCOPE.exec(scope);
    if (!match) continue;
    const [, context, resourceType, action] = match;
    let permissions = V1_PERMISSIONS[action];
    if (!permissions && action.length > 0 && V2_PERMISSIONS.test(action)) {
      permissions = action;
    }
    if (permissions) {
      grants.push({ scope, context, resourceType, permissions: new Set(permissions) });
    }
  }
  return grants;
}

const PERMISSION_BY_INTERACTION = { read: 'r', search: 's', create: 'c', update: 'u', delete: 'd' };

/**
 * Decides whether the token may perform `interaction` on `resourceType`.
 * Returns { patientId } — null when a user/system scope grants it, the token's patient when only patient scopes do.
 */
export function authorize(claims, resourceType, interaction) {
  const permission = PERMISSION_BY_INTERACTION[interaction];
  const granting = parseScopes(claims.scope).filter(
    (grant) => (grant.resourceType === '*' || grant.resourceType === resourceType) && grant.permissions.has(permission)
  );
  if (granting.some((grant) => grant.context !== 'patient')) {
    return { patientId: null };
  }
  if (granting.length > 0) {
    if (typeof claims.patient !== 'string' || !claims.patient) {
      throw new HttpError(403, `a patient/ scope allows ${interaction} on ${resourceType} but the token has no patient claim`);
    }
    return { patientId: claims.patient };
  }
  throw new HttpError(
    403,
    `the access token's scopes do not allow ${interaction} on ${resourceType} ` +
      `(needs e.g. patient/${resourceType}.${permission} or user/${resourceType}.${permission})`,
    { headers: { 'www-authenticate': 'Bearer realm="fhir", error="insufficient_scope"' } }
  );
}
