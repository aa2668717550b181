// Server profiles: behaviours of real EHR FHIR servers that CareCanvas has to cope with.
import { repositoryError } from './outcomes.mjs';

export const PROFILES = ['generic', 'no-transactions', 'pdf-only', 'small-inline', 'commit-then-503'];

// Like Oracle Health: document content must be a document format, not an image.
export const PDF_ONLY_CONTENT_TYPES = ['application/pdf', 'text/plain', 'text/html', 'application/xhtml+xml'];
export const MAX_INLINE_ATTACHMENT_BYTES = 64 * 1024;

export function offersTransactions(profile) {
  return profile !== 'no-transactions';
}

/** Yields every nested object that carries inline base64 `data` (Attachment, Signature). */
function* inlineDataHolders(value, isRoot = true) {
  if (Array.isArray(value)) {
    for (const item of value) yield* inlineDataHolders(item, false);
  } else if (value && typeof value === 'object') {
    if (!isRoot && typeof value.data === 'string') yield value;
    for (const [key, child] of Object.entries(value)) {
      // contained resources are still part of what is written inline
      if (key !== 'data') yield* inlineDataHolders(child, false);
    }
  }
}

/** Throws a Medplum OperationOutcomeError when `resource` breaks the active profile's rules. */
export function checkProfileRules(profile, resource) {
  if (profile === 'pdf-only' && resource.resourceType === 'DocumentReference') {
    (resource.content ?? []).forEach((content, index) => {
      const contentType = content.attachment?.contentType;
      if (!PDF_ONLY_CONTENT_TYPES.includes(contentType)) {
        throw repositoryError(
          400,
          `DocumentReference.content[${index}].attachment.contentType ${contentType ?? '(missing)'} is not accepted; ` +
            `this server accepts ${PDF_ONLY_CONTENT_TYPES.join(', ')}`,
          { issueCode: 'not-supported' }
        );
      }
    });
  }
  if (profile === 'small-inline' && resource.resourceType !== 'Binary') {
    for (const holder of inlineDataHolders(resource)) {
      const size = Buffer.from(holder.data, 'base64').length;
      if (size > MAX_INLINE_ATTACHMENT_BYTES) {
        throw repositoryError(
          413,
          `inline attachment data is ${size} bytes; this server accepts at most ${MAX_INLINE_ATTACHMENT_BYTES} ` +
            'bytes inline: create a Binary and put its reference in attachment.url instead'
        );
      }
    }
  }
}
