"""The sandbox SMART authorization server, split into configuration, scopes, state, OAuth logic and routes."""
