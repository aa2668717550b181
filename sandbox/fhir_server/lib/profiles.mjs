// Server profiles: behaviours of real EHR FHIR servers that CareCanvas has to cope with.
import { repositoryError } from './outcomes.mjs';

export const PROFILES = [
  'generic',
  'no-transactions',
  'pdf-only',
  'small-inline',
  'commit-then-503',
  'body-limit',
  'body-limit-500',
  'broken-next-link',
];

// Like nginx's client_max_body_size 1m in front of the EHR (changeable per test with max_body_bytes).
export const DEFAULT_MAX_BODY_BYTES = 1024 * 1024;
const NGINX_413_PAGE =
  '<html>\r\n<head><title>413 Request Entity Too Large</title></head>\r\n<body>\r\n' +
  '<center><h1>413 Request Entity Too Large</h1></center>\r\n<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n';

/** Whether the active profile's front proxy refuses a body of `size` bytes before the FHIR server sees it. */
export function proxyRefuses(profile, size, maxBodyBytes) {
  return (profile === 'body-limit' || profile === 'body-limit-500') && size > maxBodyBytes;
}

/** The proxy's answer: an nginx-style 413 page, or (body-limit-500) a bare plain-text 500. */
export function sendProxyRefusal(res, profile) {
  if (profile === 'body-limit-500') {
    res.writeHead(500, { 'content-type': 'text/plain', 'cache-control': 'no-store', connection: 'close' });
    res.end('request entity too large');
  } else {
    res.writeHead(413, { 'content-type': 'text/html', 'cache-control': 'no-store', connection: 'close' });
    res.end(NGINX_413_PAGE);
  }
}

/** broken-next-link: a same-origin `next` link with a control character, as a buggy server might send. */
export function breakNextLink(bundle, baseUrl, resourceType) {
  const link = (bundle.link ?? []).filter((item) => item.relation !== 'next');
  link.push({ relation: 'next', url: `${baseUrl}/${resourceType}?_page_token=broken\u0001link` });
  return { ...bundle, link };
}

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
