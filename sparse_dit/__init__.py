"""sparse-dit"""
