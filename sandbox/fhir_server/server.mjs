// Sandbox FHIR R4 server: Medplum's FhirRouter and in-memory repository behind our HTTP, auth and profile layer.
import { readFile, rename, writeFile } from 'node:fs/promises';
import { existsSync } from 'node:fs';
import { createServer } from 'node:http';
import { parseArgs } from 'node:util';
import { getStatus, isResourceType, OperationOutcomeError } from '@medplum/core';
import { FhirRouter } from '@medplum/fhir-router';
import { createTokenVerifier } from './lib/auth.mjs';
import { capabilityStatement } from './lib/capability.mjs';
import { errorOutcome, HttpError, withDiagnostics } from './lib/outcomes.mjs';
import {
  breakNextLink,
  DEFAULT_MAX_BODY_BYTES,
  offersTransactions,
  PROFILES,
  proxyRefuses,
  sendProxyRefusal,
} from './lib/profiles.mjs';
import { loadDefinitions, SandboxRepository, validateOrThrow } from './lib/repository.mjs';
import { authorize } from './lib/scopes.mjs';
import { Pager, searchType } from './lib/search.mjs';

const MAX_BODY_BYTES = 20 * 1024 * 1024;
const FHIR_JSON = 'application/fhir+json; charset=utf-8';

function parseCommandLine() {
  const { values } = parseArgs({
    options: {
      port: { type: 'string', default: '0' },
      'jwks-url': { type: 'string' },
      issuer: { type: 'string' },
      data: { type: 'string' },
      profile: { type: 'string', default: 'generic' },
      'max-body-bytes': { type: 'string', default: String(DEFAULT_MAX_BODY_BYTES) },
      'smart-config-file': { type: 'string' },
      // Keep the current resources in this file across restarts (synthetic data only: the demo's data dir).
      'state-file': { type: 'string' },
    },
    strict: true,
  });
  const problems = [];
  if (!values['jwks-url']) problems.push('--jwks-url URL is required');
  if (!values.issuer) problems.push('--issuer ISS is required');
  if (!PROFILES.includes(values.profile)) problems.push(`--profile must be one of ${PROFILES.join(', ')}`);
  if (!/^\d+$/.test(values.port) || Number(values.port) > 65535) problems.push('--port must be 0..65535');
  if (!/^\d{1,9}$/.test(values['max-body-bytes'])) problems.push('--max-body-bytes must be a whole number of bytes');
  if (problems.length) {
    throw new Error(problems.join('; '));
  }
  return values;
}

class State {
  constructor({ profile, dataFile, maxBodyBytes, stateFile }) {
    this.stateFile = stateFile;
    this.profile = profile;
    this.maxBodyBytes = maxBodyBytes;
    this.armed503 = profile === 'commit-then-503';
    this.dataFile = dataFile;
    this.requestLog = [];
    this.pager = new Pager();
    this.repo = new SandboxRepository({ getProfile: () => this.profile });
    this.router = new FhirRouter();
    this.lock = Promise.resolve();
  }

  setProfile(profile, maxBodyBytes) {
    if (!PROFILES.includes(profile)) {
      throw new HttpError(400, `profile must be one of ${PROFILES.join(', ')}`);
    }
    if (maxBodyBytes !== undefined && !(Number.isInteger(maxBodyBytes) && maxBodyBytes > 0)) {
      throw new HttpError(400, 'max_body_bytes must be a positive whole number');
    }
    this.profile = profile;
    if (maxBodyBytes !== undefined) this.maxBodyBytes = maxBodyBytes;
    this.armed503 = profile === 'commit-then-503';
  }

  /** Starts from the state file when there is one (the demo's data survives a restart), else from the seed. */
  async start() {
    if (this.stateFile && existsSync(this.stateFile)) {
      const bundle = JSON.parse(await readFile(this.stateFile, 'utf8'));
      await this.repo.load(bundle);
      return;
    }
    await this.reset();
  }

  /**
   * Writes every current resource to the state file (a new file renamed over the old: never half written).
   * The snapshot is taken at once (synchronously) and the writes are chained, so files land in call order.
   */
  save() {
    if (!this.stateFile) return Promise.resolve();
    const entry = [];
    for (const byId of this.repo.resources.values()) {
      for (const resource of byId.values()) entry.push({ resource });
    }
    const text = JSON.stringify({ resourceType: 'Bundle', type: 'collection', entry });
    const partial = `${this.stateFile}.partial`;
    this.saving = (this.saving ?? Promise.resolve())
      .catch(() => {})
      .then(async () => {
        await writeFile(partial, text);
        await rename(partial, this.stateFile);
      });
    return this.saving;
  }

  async reset() {
    const bundle = this.dataFile ? JSON.parse(await readFile(this.dataFile, 'utf8')) : { entry: [] };
    if (bundle.resourceType && bundle.resourceType !== 'Bundle') {
      throw new Error(`data file ${this.dataFile} must hold a FHIR Bundle`);
    }
    await this.repo.load(bundle);
    this.pager.clear();
    this.requestLog = [];
    await this.save();
  }

  /** Runs `work` alone: writes, transaction snapshots and the per-request patient limits must not interleave. */
  async exclusive(work) {
    const previous = this.lock;
    let release;
    this.lock = new Promise((resolve) => {
      release = resolve;
    });
    await previous;
    try {
      return await work();
    } finally {
      this.repo.patientLimits = new Map();
      release();
    }
  }
}

function send(res, status, body, { contentType = FHIR_JSON, headers = {} } = {}) {
  const text = body === undefined ? '' : JSON.stringify(body);
  res.writeHead(status, { 'content-type': contentType, 'cache-control': 'no-store', ...headers });
  res.end(text);
}

function sendOutcome(res, status, outcome, headers = {}) {
  send(res, status, withDiagnostics(outcome), { headers });
}

/** Reads the body up to MAX_BODY_BYTES; past that keeps draining (so the client sees the 413) and then throws. */
function readBody(req) {
  return new Promise((resolve, reject) => {
    const chunks = [];
    let size = 0;
    req.on('data', (chunk) => {
      size += chunk.length;
      if (size <= MAX_BODY_BYTES) chunks.push(chunk);
    });
    req.on('end', () => {
      if (size > MAX_BODY_BYTES) {
        reject(new HttpError(413, `request body is larger than ${MAX_BODY_BYTES} bytes; put large content in a Binary`));
      } else {
        resolve(Buffer.concat(chunks));
      }
    });
    req.on('error', reject);
  });
}

function parseJsonBody(buffer) {
  if (buffer.length === 0) {
    throw new HttpError(400, 'request body is empty; send a FHIR resource as JSON');
  }
  try {
    return JSON.parse(buffer.toString('utf8'));
  } catch {
    throw new HttpError(400, 'request body is not valid JSON');
  }
}

function checkResourceType(resourceType) {
  if (!isResourceType(resourceType)) {
    throw new HttpError(404, `${resourceType} is not a FHIR R4 resource type`, { issueCode: 'not-supported' });
  }
}

function responseHeaders(baseUrl, resource, status) {
  const headers = {};
  if (resource?.meta?.versionId) headers.etag = `W/"${resource.meta.versionId}"`;
  if (resource?.meta?.lastUpdated) headers['last-modified'] = new Date(resource.meta.lastUpdated).toUTCString();
  if (status === 201 && resource?.id) {
    headers.location = `${baseUrl}/${resource.resourceType}/${resource.id}/_history/${resource.meta?.versionId}`;
  }
  return headers;
}

/** The resource type, interaction and id of a bundle entry or single request URL relative to the base. */
function describeEntryRequest(method, url, index) {
  const where = `Bundle.entry[${index}].request`;
  if (typeof url !== 'string' || !url) throw new HttpError(400, `${where}.url is required`);
  const [path] = url.split('?');
  const segments = path.split('/').filter(Boolean);
  if (method === 'POST' && segments.length === 1) return { resourceType: segments[0], interaction: 'create' };
  if (method === 'PUT' && (segments.length === 2 || (segments.length === 1 && url.includes('?')))) {
    return { resourceType: segments[0], interaction: 'update', id: segments[1] };
  }
  throw new HttpError(400, `${where} must be POST [type] or PUT [type]/[id] (got ${method} ${path}); bundles here only write`);
}

class FhirApi {
  constructor({ state, verify, baseUrl, smartConfigFile }) {
    this.state = state;
    this.verify = verify;
    this.baseUrl = baseUrl;
    this.smartConfigFile = smartConfigFile;
  }

  async smartConfig() {
    if (!this.smartConfigFile) return undefined;
    try {
      return await readFile(this.smartConfigFile, 'utf8');
    } catch {
      return undefined;
    }
  }

  async handle(req, res, segments, url, rawBody) {
    const method = req.method;
    if (method === 'GET' && segments.length === 2 && segments[0] === '.well-known' && segments[1] === 'smart-configuration') {
      const text = await this.smartConfig();
      if (text === undefined) throw new HttpError(404, 'the SMART configuration has not been written yet');
      res.writeHead(200, { 'content-type': 'application/json', 'cache-control': 'no-store' });
      res.end(text);
      return;
    }
    if (method === 'GET' && segments.length === 1 && segments[0] === 'metadata') {
      let smartConfig;
      try {
        smartConfig = JSON.parse((await this.smartConfig()) ?? 'null');
      } catch {
        smartConfig = undefined;
      }
      send(res, 200, capabilityStatement({ baseUrl: this.baseUrl, profile: this.state.profile, smartConfig }));
      return;
    }

    const claims = await this.verify(req.headers.authorization, this.baseUrl);
    const state = this.state;
    const limits = new Map();
    const grant = (resourceType, interaction) => {
      checkResourceType(resourceType);
      limits.set(resourceType, authorize(claims, resourceType, interaction).patientId);
    };

    if (segments.length === 0 && method === 'POST') {
      const bundle = parseJsonBody(rawBody);
      await this.bundle(res, bundle, grant, limits);
      return;
    }
    if (segments.length === 1 && method === 'GET') {
      const resourceType = segments[0];
      grant(resourceType, 'search');
      const bundle = await state.exclusive(async () => {
        state.repo.patientLimits = limits;
        return searchType({
          repo: state.repo,
          pager: state.pager,
          baseUrl: this.baseUrl,
          resourceType,
          params: url.searchParams,
          visible: (resource) => state.repo.isVisible(resource),
        });
      });
      send(res, 200, state.profile === 'broken-next-link' ? breakNextLink(bundle, this.baseUrl, resourceType) : bundle);
      return;
    }
    if (segments.length === 2 && method === 'GET' && !segments[1].startsWith('_') && !segments[1].startsWith('$')) {
      const [resourceType, id] = segments;
      grant(resourceType, 'read');
      const resource = await state.exclusive(async () => {
        state.repo.patientLimits = limits;
        return state.repo.readResource(resourceType, id);
      });
      send(res, 200, resource, { headers: responseHeaders(this.baseUrl, resource, 200) });
      return;
    }
    if (segments.length === 1 && method === 'POST' && !segments[0].startsWith('$')) {
      const [resourceType] = segments;
      grant(resourceType, 'create');
      const resource = parseJsonBody(rawBody);
      await this.write(res, { method, path: `/${resourceType}`, resource, headers: req.headers, limits, isCreate: true });
      return;
    }
    if (segments.length === 2 && method === 'PUT') {
      const [resourceType, id] = segments;
      grant(resourceType, 'update');
      const resource = parseJsonBody(rawBody);
      await this.write(res, { method, path: `/${resourceType}/${id}`, resource, headers: req.headers, limits, isCreate: false });
      return;
    }
    throw new HttpError(405, `${method} ${url.pathname} is not supported by the sandbox FHIR server`);
  }

  async write(res, { method, path, resource, headers, limits, isCreate }) {
    const state = this.state;
    const [outcome, result] = await state.exclusive(async () => {
      state.repo.patientLimits = limits;
      if (!isCreate) {
        const existing = state.repo.lookup(path.slice(1));
        if (existing && !state.repo.isVisible(existing)) {
          throw new HttpError(403, 'a patient-level token may not overwrite a resource of another patient');
        }
      }
      return state.router.handleRequest(
        { method, url: path, pathname: '', body: resource, params: {}, query: {}, headers, config: { transactions: true } },
        state.repo
      );
    });
    this.answer(res, outcome, result, isCreate);
  }

  async bundle(res, bundle, grant, limits) {
    const state = this.state;
    if (bundle?.resourceType !== 'Bundle' || !['transaction', 'batch'].includes(bundle.type)) {
      throw new HttpError(400, 'POST to the base needs a Bundle of type transaction or batch');
    }
    if (bundle.type === 'transaction' && !offersTransactions(state.profile)) {
      throw new HttpError(501, 'this server does not support transaction Bundles; send the requests one at a time');
    }
    if (!Array.isArray(bundle.entry) || bundle.entry.length === 0) {
      throw new HttpError(400, 'the Bundle has no entries');
    }
    bundle.entry.forEach((entry, index) => {
      const { resourceType, interaction } = describeEntryRequest(entry.request?.method, entry.request?.url, index);
      if (entry.resource?.resourceType !== resourceType) {
        throw new HttpError(400, `Bundle.entry[${index}].resource must be a ${resourceType}`);
      }
      grant(resourceType, interaction);
    });
    const [outcome, result] = await state.exclusive(async () => {
      state.repo.patientLimits = limits;
      // Validate the Bundle itself before Medplum takes it apart (entries are validated as they are written).
      validateOrThrow({ ...bundle, entry: bundle.entry.map(({ fullUrl, request }) => ({ fullUrl, request })) });
      return state.router.handleRequest(
        { method: 'POST', url: '/', pathname: '', body: bundle, params: {}, query: {}, headers: {}, config: { transactions: true } },
        state.repo
      );
    });
    this.answer(res, outcome, result, true);
  }

  answer(res, outcome, result, isCreateLike) {
    const status = getStatus(outcome);
    if (status >= 300) {
      sendOutcome(res, status, outcome);
      return;
    }
    if (isCreateLike && this.state.profile === 'commit-then-503' && this.state.armed503) {
      // Simulates a gateway that loses the answer after the EHR committed the write.
      this.state.armed503 = false;
      sendOutcome(res, 503, errorOutcome(503, 'service temporarily unavailable; try again'), { 'retry-after': '1' });
      return;
    }
    send(res, status, result ?? withDiagnostics(outcome), { headers: responseHeaders(this.baseUrl, result, status) });
  }
}

async function handleAdmin(state, req, res, action, rawBody) {
  const json = { contentType: 'application/json' };
  if (action === 'profile' && req.method === 'GET') {
    send(res, 200, { profile: state.profile, max_body_bytes: state.maxBodyBytes }, json);
  } else if (action === 'profile' && req.method === 'PUT') {
    const body = parseJsonBody(rawBody);
    await state.exclusive(async () => state.setProfile(body?.profile, body?.max_body_bytes));
    send(res, 200, { profile: state.profile, max_body_bytes: state.maxBodyBytes }, json);
  } else if (action === 'requests' && req.method === 'GET') {
    send(res, 200, state.requestLog, json);
  } else if (action === 'reset' && req.method === 'POST') {
    await state.exclusive(() => state.reset());
    send(res, 200, { reset: true, profile: state.profile }, json);
  } else {
    throw new HttpError(404, 'admin endpoints: GET/PUT /_admin/profile, GET /_admin/requests, POST /_admin/reset');
  }
}

function toResponseError(error) {
  if (error instanceof HttpError) return error;
  if (error instanceof OperationOutcomeError) {
    const wrapped = new HttpError(getStatus(error.outcome), error.message);
    wrapped.outcome = error.outcome;
    return wrapped;
  }
  // Unexpected failures: log the stack (never bodies) and answer without internals.
  process.stderr.write(`sandbox fhir server error: ${error?.stack ?? error}\n`);
  return new HttpError(500, 'internal error in the sandbox FHIR server');
}

async function main() {
  const options = parseCommandLine();
  loadDefinitions();
  for (const profile of PROFILES) {
    // Our own CapabilityStatement must pass the same validator every write does.
    validateOrThrow(capabilityStatement({ baseUrl: 'http://127.0.0.1/fhir', profile }));
  }
  const state = new State({
    profile: options.profile,
    dataFile: options.data,
    maxBodyBytes: Number(options['max-body-bytes']),
    stateFile: options['state-file'],
  });
  await state.start();
  const verify = createTokenVerifier({ jwksUrl: options['jwks-url'], issuer: options.issuer });
  let api;

  const server = createServer(async (req, res) => {
    const url = new URL(req.url, 'http://127.0.0.1');
    const isAdmin = url.pathname.startsWith('/_admin/');
    if (!isAdmin) {
      res.on('finish', () => state.requestLog.push({ method: req.method, path: url.pathname, status: res.statusCode }));
    }
    try {
      const rawBody = await readBody(req);
      if (!isAdmin && proxyRefuses(state.profile, rawBody.length, state.maxBodyBytes)) {
        // The front proxy answers; the FHIR server never sees the request.
        sendProxyRefusal(res, state.profile);
        return;
      }
      let segments;
      try {
        segments = url.pathname.split('/').filter(Boolean).map(decodeURIComponent);
      } catch {
        throw new HttpError(400, 'request path has invalid percent-encoding');
      }
      if (isAdmin && segments.length === 2) {
        await handleAdmin(state, req, res, segments[1], rawBody);
      } else if (segments[0] === 'fhir') {
        if (state.stateFile && req.method !== 'GET' && req.method !== 'HEAD') {
          // The state is on disk before the client hears the write succeeded: a restart right after it
          // never forgets a document the client was told about.
          const end = res.end.bind(res);
          res.end = (...args) => {
            state.save().then(
              () => end(...args),
              (error) => {
                process.stderr.write(`sandbox fhir server: state file not written: ${error?.message}\n`);
                end(...args);
              }
            );
            return res;
          };
        }
        await api.handle(req, res, segments.slice(1), url, rawBody);
      } else {
        throw new HttpError(404, 'nothing here; the FHIR base is /fhir');
      }
    } catch (caught) {
      const error = toResponseError(caught);
      if (!res.headersSent) sendOutcome(res, error.status, error.outcome, error.headers);
    }
  });

  const shutdown = () => {
    server.close();
    server.closeAllConnections();
    process.exit(0);
  };
  process.on('SIGTERM', shutdown);
  process.on('SIGINT', shutdown);
  // The parent keeps our stdin open; when it goes away (even by crashing) we go too.
  process.stdin.on('end', shutdown);
  process.stdin.on('close', shutdown);
  process.stdin.resume();

  server.listen(Number(options.port), '127.0.0.1', () => {
    const { port } = server.address();
    api = new FhirApi({
      state,
      verify,
      baseUrl: `http://127.0.0.1:${port}/fhir`,
      smartConfigFile: options['smart-config-file'],
    });
    process.stdout.write(`${JSON.stringify({ ready: true, port })}\n`);
  });
}

main().catch((error) => {
  process.stderr.write(`sandbox fhir server failed to start: ${error.message}\n`);
  process.exit(1);
});
