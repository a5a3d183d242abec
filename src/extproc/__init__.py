"""Drop-in import paths of the documented callout API, served by calloutkit."""
