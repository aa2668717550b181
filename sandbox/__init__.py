"""A local EHR for the demo and the tests: FHIR server, SMART authorization server, EHR page."""
