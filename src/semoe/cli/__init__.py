"""semoe.cli"""
