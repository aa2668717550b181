// Bearer token verification: RS256 JWTs from the sandbox authorization server, checked against its JWKS.
import { createRemoteJWKSet, jwtVerify } from 'jose';
import { HttpError } from './outcomes.mjs';

const CHALLENGE = 'Bearer realm="fhir"';

function unauthorized(reason) {
  return new HttpError(401, reason, {
    headers: { 'www-authenticate': `${CHALLENGE}, error="invalid_token", error_description="${reason}"` },
    issueCode: 'login',
  });
}

/** Explains a jose failure without echoing the token. */
function describeFailure(error) {
  switch (error?.code) {
    case 'ERR_JWT_EXPIRED':
      return 'access token expired';
    case 'ERR_JWT_CLAIM_VALIDATION_FAILED':
      if (error.claim === 'aud') return 'access token audience (aud) is not this FHIR server';
      if (error.claim === 'iss') return 'access token issuer (iss) is not the trusted authorization server';
      if (error.claim === 'nbf') return 'access token is not valid yet';
      return `access token claim ${error.claim} is invalid`;
    case 'ERR_JWS_SIGNATURE_VERIFICATION_FAILED':
      return 'access token signature does not verify';
    case 'ERR_JWKS_NO_MATCHING_KEY':
      return "no key in the authorization server's key set matches the access token";
    case 'ERR_JOSE_ALG_NOT_ALLOWED':
      return 'access token must be signed with RS256';
    case 'ERR_JWKS_TIMEOUT':
    case 'ERR_JWKS_INVALID':
      return "the authorization server's key set could not be fetched";
    default:
      // jose's own failures carry an ERR_J… code; anything else is the key set fetch failing (e.g. refused).
      return String(error?.code ?? '').startsWith('ERR_J')
        ? 'access token is not a valid signed JWT'
        : "the authorization server's key set could not be fetched";
  }
}

export function createTokenVerifier({ jwksUrl, issuer }) {
  const keySet = createRemoteJWKSet(new URL(jwksUrl), { timeoutDuration: 5000, cooldownDuration: 1000 });

  /** Returns the verified claims or throws a 401 HttpError. `audience` is the FHIR base URL. */
  return async function verifyRequest(authorizationHeader, audience) {
    if (!authorizationHeader) {
      throw new HttpError(401, 'this request needs an Authorization: Bearer access token', {
        headers: { 'www-authenticate': CHALLENGE },
        issueCode: 'login',
      });
    }
    const match = /^Bearer\s+(\S+)$/i.exec(authorizationHeader);
    if (!match) {
      throw unauthorized('Authorization header must be "Bearer <access token>"');
    }
    try {
      const { payload } = await jwtVerify(match[1], keySet, {
        issuer,
        audience,
        algorithms: ['RS256'],
        requiredClaims: ['exp'],
      });
      return payload;
    } catch (error) {
      throw unauthorized(describeFailure(error));
    }
  };
}
