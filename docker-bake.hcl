# docker buildx bake: both variants of the CareCanvas image, tagged the way the chart expects
# (the API runs <tag>, GPU workers run <tag>-cuda).
variable "REPOSITORY" { default = "registry.example.org/carecanvas/carecanvas" }
variable "VERSION" { default = "0.1.0" }

group "default" { targets = ["cpu", "cuda"] }

target "cpu" {
  dockerfile = "Dockerfile"
  args = { TORCH_VARIANT = "cpu" }
  tags = ["${REPOSITORY}:${VERSION}"]
}

target "cuda" {
  inherits = ["cpu"]
  args = { TORCH_VARIANT = "cu128" }
  tags = ["${REPOSITORY}:${VERSION}-cuda"]
}
