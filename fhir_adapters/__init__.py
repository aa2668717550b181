"""Everything that speaks FHIR and SMART; never imports the service package."""
