// Type-level search with our own paging: Bundle.link self/next, an opaque page token, _count default 20, max 100.
import { randomBytes } from 'node:crypto';
import { getSearchParameter, OperationOutcomeError, parseSearchRequest } from '@medplum/core';
import { HttpError } from './outcomes.mjs';

export const DEFAULT_PAGE_SIZE = 20;
export const MAX_PAGE_SIZE = 100;
const PAGE_TOKEN = '_page_token';
const SUPPORTED_CONTROL_PARAMS = new Set(['_count', PAGE_TOKEN, '_id', '_lastUpdated', '_sort']);
const MAX_REMEMBERED_PAGES = 5000;

export class Pager {
  constructor() {
    this.pages = new Map();
  }

  clear() {
    this.pages.clear();
  }

  remember(queryKey, offset) {
    const token = randomBytes(18).toString('base64url');
    this.pages.set(token, { queryKey, offset });
    if (this.pages.size > MAX_REMEMBERED_PAGES) {
      this.pages.delete(this.pages.keys().next().value);
    }
    return token;
  }

  recall(token, queryKey) {
    const page = this.pages.get(token);
    if (!page || page.queryKey !== queryKey) {
      throw new HttpError(400, `${PAGE_TOKEN} is unknown, expired or belongs to another search; start the search again`);
    }
    return page.offset;
  }
}

function parsePageSize(values) {
  if (values.length === 0) return DEFAULT_PAGE_SIZE;
  const text = values.at(-1);
  if (!/^\d+$/.test(text)) {
    throw new HttpError(400, `_count must be a whole number from 0 to ${MAX_PAGE_SIZE}`);
  }
  return Math.min(Number.parseInt(text, 10), MAX_PAGE_SIZE);
}

/** Rejects parameters this server would otherwise silently ignore (Medplum matches nothing for unknown ones). */
function checkParameters(resourceType, params) {
  for (const name of new Set(params.keys())) {
    const code = name.split(':')[0];
    if (code.startsWith('_')) {
      if (!SUPPORTED_CONTROL_PARAMS.has(code)) {
        throw new HttpError(400, `search parameter ${name} is not supported; supported: ${[...SUPPORTED_CONTROL_PARAMS].join(', ')} and the R4 search parameters of ${resourceType}`);
      }
    } else if (code.includes('.') || !getSearchParameter(resourceType, code)) {
      throw new HttpError(400, `${resourceType} has no search parameter ${name} (chained searches are not supported)`);
    }
  }
}

/**
 * Runs GET [base]/[type]?params and returns a searchset Bundle.
 * `visible(resource)` filters out what the token may not see before paging, so totals and pages stay consistent.
 */
export async function searchType({ repo, pager, baseUrl, resourceType, params, visible }) {
  checkParameters(resourceType, params);
  const pageSize = parsePageSize(params.getAll('_count'));
  const token = params.get(PAGE_TOKEN);
  const queryParams = new URLSearchParams([...params].filter(([name]) => name !== PAGE_TOKEN && name !== '_count'));
  queryParams.sort();
  const queryKey = `${resourceType}?${queryParams}`;
  const offset = token ? pager.recall(token, queryKey) : 0;

  let searchRequest;
  try {
    searchRequest = parseSearchRequest(`${resourceType}?${queryParams}`);
  } catch (error) {
    if (error instanceof OperationOutcomeError) throw error;
    throw new HttpError(400, `search is invalid: ${error.message}`);
  }
  delete searchRequest.count;
  delete searchRequest.offset;
  const everything = await repo.search(searchRequest);
  const matches = (everything.entry ?? []).map((entry) => entry.resource).filter(visible);
  const page = matches.slice(offset, offset + pageSize);

  const pageUrl = (extra) => {
    const url = new URLSearchParams(queryParams);
    url.set('_count', String(pageSize));
    for (const [name, value] of Object.entries(extra)) url.set(name, value);
    return `${baseUrl}/${resourceType}?${url}`;
  };
  const link = [{ relation: 'self', url: pageUrl(token ? { [PAGE_TOKEN]: token } : {}) }];
  if (offset + pageSize < matches.length && pageSize > 0) {
    link.push({ relation: 'next', url: pageUrl({ [PAGE_TOKEN]: pager.remember(queryKey, offset + pageSize) }) });
  }
  return {
    resourceType: 'Bundle',
    type: 'searchset',
    total: matches.length,
    link,
    entry: page.map((resource) => ({
      fullUrl: `${baseUrl}/${resource.resourceType}/${resource.id}`,
      resource,
      search: { mode: 'match' },
    })),
  };
}
