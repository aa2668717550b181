"""CareCanvas: SMART-on-FHIR service for AI patient-education illustrations and portraits."""
